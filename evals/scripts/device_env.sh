# Sourced by the GPU scripts beside it, run from the checkout's root on a device machine: the model cache and the
# carried copy of ../shared under the checkout, unbuffered Python, no Hub, specdec installed (editable); `out` is
# where results go ($OUT on the device machine), out/ holds what later stages of one warm machine reuse.
export SPECDEC_CACHE=${SPECDEC_CACHE:-$PWD/out/cache} SPECDEC_SHARED=${SPECDEC_SHARED:-$PWD/.shared}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning || true
out=${OUT:-out}
mkdir -p out "$out"
