# Steps shared by the setup scripts (scripts/setup*.sh, integrations/vllm/setup.sh,
# benchmarks/server/lm_eval_setup.sh; sourced, not run). The script calls begin_setup first, then
# sets key (a hash of everything that decides what gets installed) and has_core (a Python check that
# the packages are there).

begin_setup() {  # begin_setup NAME VENV WHEELHOUSE [--quiet]: the variables the steps below read
    # NAME "" is the main venv; WHEELHOUSE "" installs from the index (no wheelhouse).
    start=$SECONDS
    tag="setup${1:+($1)}"
    venv=$2
    py="$venv/bin/python"
    stamp="$venv/.omnikv${1:+-$1}-setup-stamp"
    log="$venv/setup.log"
    wheels="${3:+$3/wheels}"
    quiet=0
    [[ "${4:-}" == "--quiet" ]] && quiet=1
    return 0
}

exit_if_current() {  # nothing to do when the stamp matches the key and the packages are there
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]] && "$py" -c "$has_core" 2>/dev/null; then
        echo "$tag: $venv is up to date, nothing installed ($((SECONDS - start)) s)"
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

fill_wheelhouse() {  # fill_wheelhouse REQUIREMENT...: resolve into $wheels, wheels only
    # Files already there are not downloaded again. A package PyPI offers only as an sdist (fire,
    # kvpress's dependency) is built into a wheel here, while the index is reachable: the offline
    # install from the wheelhouse could not build it, its build dependencies (`wheel` for a setup.py
    # package) are not in the wheelhouse.
    mkdir -p "$wheels"
    run "$py" -m pip download --disable-pip-version-check --dest "$wheels" "$@"
    local sdist base wheel_glob
    shopt -s nullglob nocaseglob
    for sdist in "$wheels"/*.tar.gz "$wheels"/*.zip; do
        base=$(basename "$sdist"); base=${base%.tar.gz}; base=${base%.zip}
        # A wheel's file name spells the project with underscores: fire-0.6.0 -> fire-0.6.0-*.whl.
        wheel_glob="$wheels/$(tr -- '-.' '__' <<<"${base%-*}")-${base##*-}-*.whl"
        compgen -G "$wheel_glob" >/dev/null || run "$py" -m pip wheel --disable-pip-version-check --no-deps --wheel-dir "$wheels" "$sdist"
    done
    shopt -u nullglob nocaseglob
}

finish_setup() {  # record what was installed
    echo "$key" > "$stamp"
    echo "$tag: done in $((SECONDS - start)) s"
}
