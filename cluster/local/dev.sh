#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine (Python 3.11) and run the main job or the tests.
#
#   bash cluster/local/dev.sh run     # set up, then the Fashion-MNIST-LT job: CE, logit-adjusted CE, Dynamic Loss
#   bash cluster/local/dev.sh test    # set up, then the whole test suite
#
# Set-up is idempotent: a virtual environment in .venv with the pinned torch/torchvision pair
# (constraints.txt), and the Debian package dataset-fashion-mnist when apt is usable (root or sudo).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

setup() {
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
  fi
  # pip runs when pyproject.toml or constraints.txt changed since the last set-up (the install is editable: code
  # changes need none). Reinstalling the editable package removes it for a moment, which a test process starting
  # Ray workers beside it (the README-command test runs this) must not see.
  local stamp=.venv/.dynloss-setup
  local want
  want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
    echo "$want" > "$stamp"
  fi
  if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    if command -v apt-get >/dev/null 2>&1 && { $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; }; then
      echo "installed dataset-fashion-mnist"
    else
      echo "warning: could not install the Debian package dataset-fashion-mnist (needs apt and root/sudo);" \
           "Fashion-MNIST tests will be skipped and the main job falls back to scikit-learn's digits" >&2
    fi
  fi
}

case "${1:-}" in
  run)
    setup
    shift
    if [ -d /usr/share/datasets/fashion-mnist ]; then config=pipelines/configs/fashion_mnist_lt.yaml
    else config=pipelines/configs/digits.yaml; fi
    exec .venv/bin/dynloss train --config "$config" --compare ce logit_adjusted dynamic "$@"
    ;;
  test)
    setup
    shift
    # -X faulthandler: a crash prints every thread's stack, also after pytest has finished (tests/conftest.py).
    # Two test processes, each taking whole files (a module's Ray runtime and fixtures stay in one process): the
    # Ray tests wait on process start-ups a good part of the time, so two share two cores ~1.3x faster than one
    # (docs/ci.md). `-n 0` runs in one process; a later `-n N` wins.
    exec .venv/bin/python -X faulthandler -m pytest -q -n 2 --dist loadfile "$@"
    ;;
  *)
    echo "usage: bash cluster/local/dev.sh run|test [extra args]" >&2
    exit 2
    ;;
esac
