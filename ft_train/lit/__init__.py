"""Lightning glue: the stage modules, schedules and callbacks."""

from .callbacks import LossCurvePlot, read_metric
from .module import ClipStageModule, FantasyTalkingModule, FrameStageModule

__all__ = ["ClipStageModule", "FantasyTalkingModule", "FrameStageModule", "LossCurvePlot", "read_metric"]
