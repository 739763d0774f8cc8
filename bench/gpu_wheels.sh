#!/usr/bin/env bash
# The wheels bench/gpu.py needs on a GPU machine whose Python has torch, transformers and
# accelerate but not bitsandbytes or optuna (the workplace's H100/H200 image): downloaded
# here into .whl/ (ignored by git), carried along and installed there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
# About 50 MB, bitsandbytes (all CUDA versions in one wheel) being most of it.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    bitsandbytes==0.50.2 optuna==5.0.0 alembic==1.20.1 sqlalchemy==2.1.9 colorlog==6.12.0 \
    mako==1.4.3 peft==0.21.2
du -sh .whl
