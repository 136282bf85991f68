#!/usr/bin/env bash
# Contract test of rlcredit.integrations.verl against the REAL verl, in its own virtual environment.
#
# verl needs transformers < 5.11 and ray, which must stay out of the main .venv, so this script
# builds .venv-verl (CPU torch, pinned), installs verl without its GPU extras, and runs
# scripts/verl_contract_test.py: verl's own get_policy_loss_fn("rlcredit"), get_adv_estimator_fn,
# agg_loss, ppo_loss / vanilla loss and ray_trainer.compute_advantage against ours (and loss_mode=rlcredit with
# cispo/sapo/gmpo/kl_cov/clip_cov against verl's own loss modes through ppo_loss); and
# scripts/verl_contract_methods_test.py: verl's cispo, sapo, geo_mean, kl_cov and clip_cov against rlcredit's.
#
#   scripts/verl_contract.sh                 # build (once) and test
#   VERL_VERSION=0.9.1 VERL_VENV=/tmp/v scripts/verl_contract.sh
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu scripts/verl_contract.sh   # CPU torch elsewhere
#
# torch is ALWAYS installed with the constraint torch==$TORCH_VERSION: an unpinned resolve would
# pull the multi-GB CUDA wheels.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VERL_VENV:-$ROOT/.venv-verl}"
VERL_VERSION="${VERL_VERSION:-0.9.1}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TRANSFORMERS_SPEC="${TRANSFORMERS_SPEC:-transformers>=5.5.3,<5.11,!=5.6.0}"
STAMP="$VENV/.rlcredit-verl-$VERL_VERSION"

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ ! -f "$STAMP" ]]; then
    echo "== building $VENV (verl $VERL_VERSION, torch $TORCH_VERSION CPU)"
    "$PYTHON" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip)
    CONSTRAINTS="$VENV/constraints-verl.txt"
    printf 'torch==%s\n%s\n' "$TORCH_VERSION" "$TRANSFORMERS_SPEC" > "$CONSTRAINTS"
    # verl's wheel is pure Python; check that it resolves before installing anything heavy.
    "${PIP[@]}" download -q --no-deps "verl==$VERL_VERSION" -d "$VENV/dl"
    TORCH_ARGS=()
    [[ -n "${TORCH_INDEX:-}" ]] && TORCH_ARGS=(--extra-index-url "$TORCH_INDEX")
    "${PIP[@]}" install -q -c "$CONSTRAINTS" "${TORCH_ARGS[@]}" "torch==$TORCH_VERSION"
    if "$VENV/bin/python" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
        echo "error: a CUDA torch was installed; set TORCH_INDEX to a CPU wheel index" >&2
        exit 1
    fi
    # verl's base requirements (ray, tensordict, hydra, transformers < 5.11...), none of its GPU
    # extras (vllm, sglang, fsdp, megatron pin their own torch and CUDA stacks). verl 0.9.1's
    # trainer (verl.trainer.ppo.ray_trainer, whose compute_advantage the test calls) also imports
    # cachetools, uvicorn and fastapi, which its base requirements miss.
    "${PIP[@]}" install -q -c "$CONSTRAINTS" "verl==$VERL_VERSION" cachetools uvicorn fastapi
    "${PIP[@]}" install -q -c "$CONSTRAINTS" -e "$ROOT" pytest
    touch "$STAMP"
fi

echo "== verl contract test"
cd "$ROOT"
"$VENV/bin/python" -c "import verl, transformers, torch; print('verl', verl.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider scripts/verl_contract_test.py scripts/verl_contract_methods_test.py "$@"
