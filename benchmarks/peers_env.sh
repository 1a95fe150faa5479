#!/usr/bin/env bash
# Create .peers-venv: this project plus the peer influence libraries it is compared with, kept
# out of the main environment (their pins conflict with each other and with ours).
#
#   bash benchmarks/peers_env.sh && .peers-venv/bin/python -m benchmarks.kronfluence_ekfac
#   .peers-venv/bin/python -m pytest tests/estimators/test_kronfluence.py tests/estimators/test_pydvl.py
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .peers-venv
. .peers-venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev]"
# kronfluence lists torchvision, which has no CPU build here and which kronfluence never
# imports: install its other requirements, then kronfluence itself without dependencies.
python -m pip install --quiet "accelerate>=0.31" "einops>=0.8" "einconv>=0.1" "opt-einsum>=3.3" \
    "safetensors>=0.4.2"
python -m pip install --quiet --no-deps "kronfluence==1.0.1"
# pyDVL 0.10 pins numpy < 2 and needs zarr (2.x goes with numpy 1.x); captum for later adapters.
python -m pip install --quiet "pydvl==0.10.0" "numpy<2" "zarr<3" "captum==0.9.0"
# dattri 0.3.0 (numpy>=1.25, so pyDVL's numpy<2 still holds; it pulls in pretty_midi).
python -m pip install --quiet "dattri==0.3.0" "numpy<2"
# curvlinops (an independent curvature library: the reference for our Gauss-Newton, Hessian and
# K-FAC products) and traker (TRAK's reference implementation). backpack, which curvlinops
# lists, asks for torchvision (no CPU build here, never imported on these paths): both are
# installed without dependencies and their other requirements named, under a torch pin.
echo "torch==2.13.0" > .peers-venv/torch-pin.txt
python -m pip install --quiet --no-deps "backpack-for-pytorch==1.7.1" "curvlinops-for-pytorch==3.0.1"
python -m pip install --quiet -c .peers-venv/torch-pin.txt "unfoldNd>=0.2" "einops>=0.3" \
    "einconv>=0.1" "linear_operator>=0.2" "opt-einsum>=3.4" "traker==0.3.2" "numpy<2"
# torch-influence is not on PyPI. With TORCH_INFLUENCE_SRC naming a directory that holds its
# torch_influence package (a checkout of github.com/alstonlo/torch-influence), the environment
# imports it from there; without it, the torch-influence adapters are skipped.
if [ -n "${TORCH_INFLUENCE_SRC:-}" ]; then
    if [ ! -d "$TORCH_INFLUENCE_SRC/torch_influence" ]; then
        echo "TORCH_INFLUENCE_SRC=$TORCH_INFLUENCE_SRC has no torch_influence package" >&2
        exit 1
    fi
    site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (cd "$TORCH_INFLUENCE_SRC" && pwd) > "$site/torch_influence_src.pth"
    python -c "import torch_influence; print('torch_influence from', torch_influence.__file__)"
fi
python -c "import curvlinops, trak; print('curvlinops and traker import')"
python -c "import kronfluence, pydvl, torch; print('kronfluence', kronfluence.__version__, 'pydvl', pydvl.__version__, 'torch', torch.__version__)"
