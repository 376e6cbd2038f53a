# Steps shared by scripts/setup.sh and integrations/vllm/setup.sh (sourced, not run). The caller
# sets: tag (message prefix), quiet (0/1), start ($SECONDS at its start), py, stamp, log, key (a
# hash of everything that decides what gets installed) and has_core (a Python check that the
# packages are there).

exit_if_current() {  # nothing to do when the stamp matches the key and the packages are there
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]] && "$py" -c "$has_core" 2>/dev/null; then
        echo "$tag: .venv is up to date, nothing installed ($((SECONDS - start)) s)"
        exit 0
    fi
}

make_venv() {  # the venv (if missing) and an empty log
    if [[ ! -x "$py" ]]; then
        "${PYTHON:-python3}" -m venv "$(dirname "$(dirname "$py")")"
    fi
    : > "$log"
}

run() {  # run a pip step; when quiet, keep its output in the log and show it only if it fails
    echo "$tag: $*"
    if (( quiet )); then
        if ! "$@" >>"$log" 2>&1; then
            cat "$log" >&2
            echo "$tag: FAILED: $*" >&2
            exit 1
        fi
    else
        "$@"
    fi
}

finish_setup() {  # record what was installed
    echo "$key" > "$stamp"
    echo "$tag: done in $((SECONDS - start)) s"
}
