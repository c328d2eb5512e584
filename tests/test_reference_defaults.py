"""The reference recipes' settings against the reference trainers' own command-line defaults
(qlabs-eng/slowrun at fd342f0 in ../shared/reference, read with `ast`, never run): each row is
a setting that means the same on both sides. Skipped where the reference folder is absent."""

import ast
import os
from pathlib import Path

import pytest

from slowrun.config import build_config

REF = Path(os.environ.get("SLOWRUN_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))
SLOWRUN = REF / "qlabs-slowrun-fd342f0"
pytestmark = pytest.mark.skipif(not (SLOWRUN / "train.py").is_file(), reason=f"the reference's trainers not found at {SLOWRUN}")

TRAINERS = {"limited": "train.py", "two_hour": "two_hour/train.py", "tiny": "tiny/train.py",
            "unlimited": "unlimited/train.py"}
SAME = {  # reference flag -> our key, where the two mean the same
    "dropout": "model.dropout", "weight-decay": "optim.weight_decay", "total-batch-size": "train.batch_tokens",
    "num-epochs": "train.epochs", "logit-cap": "model.logit_softcap", "stoch-depth": "model.stoch_depth",
    "mtp-weight": "model.mtp_weight", "iha-lr": "optim.iha_lr", "swa-last-epochs": "optim.swa_epochs",
    "dupe-layers-start": "model.loop_start", "ns-steps": "optim.muon_ns_steps", "muon-momentum": "optim.muon_momentum",
}


def argparse_defaults(path: Path) -> dict[str, object]:
    """{flag: default} of every parser.add_argument("--flag", ..., default=<literal>) in a script."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args:
            flag = node.args[0].value if isinstance(node.args[0], ast.Constant) else None
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if isinstance(flag, str) and flag.startswith("--") and isinstance(default, ast.Constant):
                out[flag[2:]] = default.value
    return out


@pytest.mark.parametrize("recipe", sorted(TRAINERS))
def test_recipe_settings_equal_the_reference_trainers_defaults(recipe):
    defaults = argparse_defaults(SLOWRUN / TRAINERS[recipe])
    cfg = build_config(recipe)
    checked = {flag: key for flag, key in SAME.items() if flag in defaults and defaults[flag] is not None}
    assert len(checked) >= 5, sorted(defaults)  # the parser was read
    for flag, key in checked.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == pytest.approx(defaults[flag]), f"{recipe}: --{flag} vs {key}"
