#!/usr/bin/env bash
# Sourced by the GPU scripts that run SmolLM2-135M-Instruct: stage `stash` keeps the carried GGUF part(s) outside the
# checkout and exits; stage `bench` joins all the parts, checks the sha256, installs the carried `gguf` wheel and
# converts the model once (see gpu_real_model_bench.sh for the calls). Sets `name` (the catalogue name).
stage=${1:?stash or bench}
stash=/tmp/specdec_gguf
mkdir -p "$stash"
cp .gguf_parts/smollm2.part* "$stash"/
if [ "$stage" = stash ]; then ls -la "$stash"; exit 0; fi
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/gguf-*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
source "$(dirname "$0")/device_env.sh"
name=smollm2-135m-instruct
gguf=$SPECDEC_CACHE/gguf/$name.gguf
mkdir -p "$(dirname "$gguf")"
cat "$stash"/smollm2.part?? > "$gguf.tmp"  # the parts in order, however many were carried
sha=$(sha256sum "$gguf.tmp" | cut -d' ' -f1)
python3 -c "from specdec.models import CATALOGUE; assert CATALOGUE['$name'].sha256 == '$sha', 'checksum mismatch'"
mv "$gguf.tmp" "$gguf"
specdec models pull "$name"   # the GGUF is in place: this converts it (once) and caches the folder
