#!/usr/bin/env bash
# System packages and services the full test suite needs beyond pip:
#   - Debian's headless Chromium (the report is rendered and its figures checked),
#   - a one-node SLURM cluster (the pipeline is run through the SLURM executor plugin),
#   - HEASARC's fitsverify (Debian package fitsverify): every route's cutout FITS must pass it.
# Acts only as root on a Debian-like machine (CI and the project's dev machines); elsewhere it
# does nothing and the tests that need these skip, saying why. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "test-services: not root with apt-get; Chromium/SLURM/fitsverify tests will skip"
  exit 0
fi
if ! command -v chromium >/dev/null 2>&1; then
  echo "test-services: installing Debian chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if ! command -v fitsverify >/dev/null 2>&1; then
  echo "test-services: installing Debian fitsverify"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fitsverify >/dev/null
fi
bash scripts/slurm/start.sh
