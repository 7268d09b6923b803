#!/usr/bin/env bash
# ft-prep as a SLURM array job, then one merge job for manifest, statistics and report.
#
#   slurm/prep.sh INPUT OUTPUT [NUM_TASKS] [ft-prep overrides...]
#   e.g. slurm/prep.sh videos.txt /data/shards 32 fps=23 videos_per_shard=8
#
# INPUT is a folder or a list file of videos (one path per line). Every task reads the same
# sorted list; shard i (videos_per_shard videos each) belongs to task i % NUM_TASKS, so tasks
# never write the same shard and a requeued or re-submitted task skips the shards it finished.
# The merge job (afterany, so one failed task does not block the report) rebuilds
# manifest.json, stats.json and report.{json,txt} from OUTPUT/parts/; the report lists any
# shard still missing — re-submit the same command to finish them.
#
# Resources per task: set SBATCH_* variables or edit the #SBATCH lines below; each task uses
# all CPUs it is given (num_workers = SLURM_CPUS_PER_TASK). PYTHON selects the interpreter.
#SBATCH --job-name=ft-prep
#SBATCH --cpus-per-task=16
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

PYTHON=${PYTHON:-python}
prep() { "$PYTHON" -m data_tools.prep "$@"; }

if [[ -n "${FT_PREP_STAGE:-}" ]]; then
    # Inside a job (submitted by the branch below); arguments are passed through.
    input=$1 output=$2 num_tasks=$3
    shift 3
    if [[ "$FT_PREP_STAGE" == task ]]; then
        prep input="$input" output="$output" task_index="$SLURM_ARRAY_TASK_ID" num_tasks="$num_tasks" \
            num_workers="${SLURM_CPUS_PER_TASK:-1}" progress=false "$@"
    else
        prep input="$input" output="$output" mode=merge "$@"  # prints report.txt
    fi
    exit $?
fi

if [[ $# -lt 2 ]]; then
    echo "usage: slurm/prep.sh INPUT OUTPUT [NUM_TASKS] [ft-prep key=value ...]" >&2
    exit 2
fi
input=$(realpath "$1") output=$(realpath -m "$2") num_tasks=${3:-8}
shift $(( $# >= 3 ? 3 : 2 ))
mkdir -p "$output/logs"
script=$(realpath "$0")

array_id=$(FT_PREP_STAGE=task sbatch --parsable --array="0-$((num_tasks - 1))" \
    --output="$output/logs/task-%A_%a.out" --export=ALL,FT_PREP_STAGE=task \
    "$script" "$input" "$output" "$num_tasks" "$@")
merge_id=$(sbatch --parsable --dependency="afterany:${array_id}" --cpus-per-task=1 --mem=4G --time=00:30:00 \
    --job-name=ft-prep-merge --output="$output/logs/merge-%j.out" --export=ALL,FT_PREP_STAGE=merge \
    "$script" "$input" "$output" "$num_tasks" "$@")
echo "submitted array job $array_id ($num_tasks tasks) and merge job $merge_id; logs in $output/logs"
