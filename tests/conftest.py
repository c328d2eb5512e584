"""Shared fixtures: small prepared datasets (made once per session) and tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _prepare(out: Path, **kw) -> Path:
    from slowrun.prepare import PrepareConfig, prepare

    args = dict(source="builtin", tokenizer="gpt2", train_tokens=20_000, val_tokens=4_000, test_tokens=4_000,
                out=str(out), progress=False)
    args.update(kw)
    return prepare(PrepareConfig(**args))


@pytest.fixture(scope="session")
def prepare_dataset():
    return _prepare


@pytest.fixture(scope="session")
def gpt2_ds(tmp_path_factory) -> Path:
    """Builtin prose, GPT-2 tokens: 20k train, 4k val, 4k test."""
    return _prepare(tmp_path_factory.mktemp("data") / "gpt2")


@pytest.fixture(scope="session")
def bpe_ds(tmp_path_factory) -> Path:
    """Builtin prose, a 512-token BPE trained on the training text: 40k train, 4k val, 4k test."""
    return _prepare(tmp_path_factory.mktemp("data") / "bpe", tokenizer="bpe:512", train_tokens=40_000)


def smoke_config(data: Path, **overrides):
    """The smoke recipe on a test dataset, with overrides as {"section.key": value}."""
    from slowrun.config import build_config

    base = {"data.path": str(data), "eval.max_tokens": 2048}
    base.update(overrides)
    return build_config("smoke", base)


@pytest.fixture
def smoke_cfg():
    return smoke_config


def with_field_added_later(monkeypatch, module, value):
    """slowrun as a later version: every resolved config that `module` builds holds data.future_knob
    = value, a field whose default is 0 (and which the ledger's key therefore knows)."""
    from slowrun import config, ledger

    real_dict, real_defaults = module.config_to_dict, config.section_defaults
    monkeypatch.setattr(module, "config_to_dict", lambda c: {**real_dict(c), "data": {**real_dict(c)["data"], "future_knob": value}})
    monkeypatch.setattr(ledger, "section_defaults",
                        lambda sec: {**real_defaults(sec), **({"future_knob": 0} if sec == "data" else {})})


@pytest.fixture(autouse=True)
def _loss_kernel_setting_restored():
    """A run trained in the test process sets whether the fused loss's kernels are built
    (train.compile_loss; smoke's is off) for the whole process: each test starts from the default."""
    from slowrun import losses
    saved = dict(losses._COMPILE)
    yield
    losses.compile_kernels(saved["on"], saved["warn"])


@pytest.fixture
def eager_loss_kernels():
    """The fused output layer's elementwise kernels run eagerly, for the parity tests against the
    reference's and nanochat's own (eager) code: the compiled kernel's exp and tanh differ from
    eager ones in the last bit, and Muon turns the near-zero early gradients of zero-initialised
    matrices into full-size updates, so ten steps apart by an ulp end ~1e-1 apart. The kernel's
    equality to its eager run is tested apart (test_gpt.py)."""
    from slowrun import losses
    losses.compile_kernels(False)
    yield
    losses.compile_kernels(True)
