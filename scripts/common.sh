# Shared by the check scripts (sourced, from the repository root):
#   source scripts/common.sh NAME "$@"
# `--if-possible` among the arguments turns "cannot run" into a skip that
# says why; `skip REASON` ends the script either way; `target_dir` prints
# where cargo builds (CARGO_TARGET_DIR may point elsewhere).

check_name=$1
shift
lenient=false
[[ "${1:-}" == "--if-possible" ]] && lenient=true

skip() {
    if $lenient; then
        echo "$check_name: skipped: $*"
        exit 0
    fi
    echo "$check_name: cannot run: $*" >&2
    exit 1
}

target_dir() {
    cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
}
