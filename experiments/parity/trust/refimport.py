"""Import the authors' PyTorch code (epfml/personalized-collaborative-llms) from an exported tree.

Nothing of the reference is copied here: its `src/` is put on `sys.path` and imported as is.
Only what cannot run offline is stubbed, before the import:

- `wandb` (logging; a recording stub, `REF.wandb_calls`) and `torchtext` (only the AG News
  builder imports it; torchtext has no wheel for current torch) when they are not installed;
- `tiktoken.get_encoding` (downloads the GPT-2 BPE; the model only stores the tokenizer, we feed
  token ids directly) returns None;
- `data.agnews`, `data.github_wiki`, `data.three_multi` (HEAD layout): these modules download
  datasets at import time; `optim.strategies` only needs their `MIXED_TOKENS_DIST` /
  `SPECIFIC_TOKENS_DIST` constants, which are read from the reference's own files with `ast`
  (literal assignments, nothing executed).

Two layouts are recognised:

- `head`: branch `main` (after the 5-6 May 2024 refactor): trust rules in `src/optim/strategies.py`,
  called from `aggregate()` in `src/optim/lora.py`.
- `paper`: the paper-era code (branch `rebutal`, commits a40a58f/cd003dd): everything inline in
  `src/optim/lora.py` (`__average_dynamic_ref`, ...).

The reference directory comes from `--ref-dir` or the `REF_DIR` environment variable.
"""

from __future__ import annotations

import ast
import os
import sys
import types
from pathlib import Path


class _WandbStub(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def log(self, *args, **kwargs):
        self.calls.append((args, kwargs))

    def init(self, *args, **kwargs):
        return None


_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def _arith(node):
    """Literal lists of numbers and + - * / between them (e.g. `[3 / 4, 1 / 4]`), nothing else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_arith(e) for e in node.elts]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_arith(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    raise ValueError(f"not a numeric literal: {ast.dump(node)[:80]}")


def _literal_constants(path: Path, names: tuple[str, ...]) -> dict:
    tree = ast.parse(path.read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id in names:
                out[target.id] = _arith(node.value)
    return out


class Reference(types.SimpleNamespace):
    """The imported reference: `layout`, `src`, modules `utils`, `models`, `lora` (optim.lora),
    `strategies` (HEAD only, else None), `torch`, and `fn(name)` for its module-level
    double-underscore helpers (`__trust_weights_ref`, `__weighted_average`, ...)."""

    def fn(self, name: str):
        mod = self.strategies if self.layout == "head" else self.lora
        return getattr(mod, name)


_LOADED: Reference | None = None


def resolve_ref_dir(ref_dir: str | None) -> Path:
    ref_dir = ref_dir or os.environ.get("REF_DIR")
    if not ref_dir:
        raise SystemExit("give the exported reference tree with --ref-dir or REF_DIR")
    path = Path(ref_dir).expanduser().resolve()
    if not (path / "src" / "optim" / "lora.py").is_file():
        raise SystemExit(f"{path} does not look like the reference tree (no src/optim/lora.py)")
    return path


def load_reference(ref_dir: str | None = None) -> Reference:
    """Imports the reference once per process (its top-level package names are generic:
    `optim`, `models`, `data`, `config`, `distributed`)."""
    global _LOADED
    path = resolve_ref_dir(ref_dir)
    if _LOADED is not None:
        if _LOADED.root != path:
            raise RuntimeError("a different reference tree is already imported in this process")
        return _LOADED
    src = path / "src"
    sys.path.insert(0, str(src))

    wandb_stub = None
    try:
        import wandb  # noqa: F401
    except ImportError:
        wandb_stub = _WandbStub()
        sys.modules["wandb"] = wandb_stub
    try:
        import torchtext  # noqa: F401
    except Exception:
        sys.modules["torchtext"] = types.ModuleType("torchtext")

    import tiktoken

    tiktoken.get_encoding = lambda *args, **kwargs: None

    layout = "head" if (src / "optim" / "strategies.py").is_file() else "paper"
    if layout == "head":
        import data  # the reference's package (namespace or regular)

        for name in ("agnews", "github_wiki", "three_multi"):
            file = src / "data" / f"{name}.py"
            if not file.is_file():
                continue
            mod = types.ModuleType(f"data.{name}")
            mod.__file__ = str(file)
            consts = _literal_constants(file, ("MIXED_TOKENS_DIST", "SPECIFIC_TOKENS_DIST"))
            for k, v in consts.items():
                setattr(mod, k, v)
            sys.modules[f"data.{name}"] = mod
            setattr(data, name, mod)

    import models.lora as models_lora
    import optim.lora as optim_lora
    import optim.utils as optim_utils
    import torch

    strategies = None
    if layout == "head":
        import optim.strategies as strategies

    _LOADED = Reference(
        root=path,
        src=src,
        layout=layout,
        torch=torch,
        utils=optim_utils,
        models=models_lora,
        lora=optim_lora,
        strategies=strategies,
        wandb=sys.modules["wandb"],
        wandb_stub=wandb_stub,
    )
    return _LOADED
