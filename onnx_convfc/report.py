"""What a rewrite did: one row per conv, a summary line, a table and JSON."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .io import save_text


@dataclass(frozen=True)
class ConvRow:
    """One conv: where it is, its geometry, and either its lowering or why it was left alone."""

    node: str
    op_type: str
    scope: str
    geometry: str
    lowering: str | None
    reason: str | None
    weight_bytes_before: int
    weight_bytes_after: int  # constants the lowering added; one shared counts where first added
    # what shaped the lowering: the requested --method's refusal and the fallback, the
    # --objective latency choice, a BatchNormalization folded in ("; " between them)
    note: str | None = None
    # "runtime" when the weight, bias or a quantization parameter is computed by the graph:
    # the lowered form reshapes it with nodes, so a weight-only quantizer cannot take it
    weights: str = "constant"
    # the requested --method refused the conv and auto's choice was taken (``plan.Decision``);
    # printed as "fallback", not in the JSON (``Report.to_dict``)
    fallback: bool = False


@dataclass
class Report:
    rows: list[ConvRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rewritten(self) -> list[ConvRow]:
        return [r for r in self.rows if r.lowering]

    @property
    def skipped(self) -> list[ConvRow]:
        return [r for r in self.rows if not r.lowering]

    def summary(self) -> str:
        counts = Counter(r.lowering for r in self.rewritten)
        detail = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
        text = f"rewrote {len(self.rewritten)}/{len(self.rows)} convs"
        if detail:
            text += f" ({detail})"
        return f"{text} in {self.seconds:.2f} s"

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "rewritten": len(self.rewritten),
            "total": len(self.rows),
            "seconds": round(self.seconds, 4),
            "notes": list(self.notes),
            "convs": [{k: v for k, v in asdict(r).items() if k != "fallback"}
                      for r in self.rows],
        }

    def write_json(self, path: str | Path) -> None:
        save_text(json.dumps(self.to_dict(), indent=2) + "\n", path)

    def render(self, console) -> None:
        """Print the table, the notes and the summary on a ``rich`` console."""
        from rich.table import Table

        table = Table(show_lines=False, pad_edge=False, box=None, header_style="bold")
        for col in ("conv", "op", "geometry", "lowering / reason", "bytes before", "after"):
            table.add_column(col, justify="right" if "bytes" in col or col == "after" else "left")
        for r in self.rows:
            where = r.node if r.scope == "main" else f"{r.node} [{r.scope}]"
            verdict = r.lowering if r.lowering else f"skipped: {r.reason}"
            if r.fallback:
                verdict += " (fallback)"
            if r.lowering and r.weights == "runtime":
                verdict += " (run-time weights)"
            table.add_row(where, r.op_type, r.geometry, verdict,
                          size_text(r.weight_bytes_before),
                          size_text(r.weight_bytes_after) if r.lowering else "-")
        if self.rows:
            console.print(table)
        for r in self.rows:
            if r.note:
                label = "fallback" if r.fallback else "note"
                console.print(f"{label}: {r.node}: {r.note}", highlight=False)
        for note in self.notes:
            console.print(f"note: {note}", highlight=False)
        console.print(self.summary(), highlight=False)


def size_text(n: int) -> str:
    """``67108864`` -> ``64.0 MiB``; small sizes in KiB or B."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
