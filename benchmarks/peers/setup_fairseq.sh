#!/usr/bin/env bash
# Install fairseq 0.12 (PyPI fairseq-fixed) into its own virtual environment, outside encdec's
# .venv, with the same torch as encdec. Idempotent: an existing, working install is kept.
#
#   benchmarks/peers/setup_fairseq.sh [VENV]     (default: $ENCDEC_PEERS/fairseq, where
#                                                 ENCDEC_PEERS defaults to ~/.cache/encdec-peers)
# Prints the venv's python on its last line.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-${ENCDEC_PEERS:-$HOME/.cache/encdec-peers}/fairseq}"
torch_pin="$(grep -o 'torch==[0-9.]*' "$here/Makefile" | head -1)"
py="$venv/bin/python"
if [ -x "$py" ] && "$py" -c "import fairseq, torch; assert torch.__version__.startswith('${torch_pin#torch==}')" 2>/dev/null; then
    echo "$py"; exit 0
fi
python3 -m venv "$venv"
"$py" -m pip install -q --upgrade "pip<25" "setuptools<70" wheel
# fairseq's setup.py imports torch and numpy and cythonizes: build without isolation, against
# the pinned torch. numpy < 2: fairseq 0.12 still uses aliases numpy 2 removed.
"$py" -m pip install -q "$torch_pin" "numpy<2" "cython<3"
"$py" -m pip install -q --no-build-isolation fairseq-fixed==0.12.3.1 >&2
"$py" -c "import fairseq, torch; print('fairseq', fairseq.__version__, 'torch', torch.__version__)" >&2
echo "$py"
