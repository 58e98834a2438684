# Sourced by the device scripts (gpu_check.sh, gpu_session.sh): $OUT, $PY, a clean kernel
# switch, and, on a bare device machine where loraplex is not installed, the repository's folders
# mapped under the `loraplex` namespace. Run from the repository root.
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
unset TRITON_INTERPRET LORAPLEX_KERNELS
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import loraplex.kernels" 2>/dev/null; then
    mkdir -p /tmp/loraplex_ns/loraplex
    for d in server scheduler memory model kernels clients loadtest; do
        ln -sfn "$PWD/$d" "/tmp/loraplex_ns/loraplex/$d"
    done
    export PYTHONPATH="/tmp/loraplex_ns:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
