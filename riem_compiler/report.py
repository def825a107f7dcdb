"""Per-layer records and totals of one compression run: printable, JSON, markdown."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class LayerRecord:
    name: str
    kind: str
    shape: tuple[int, ...]
    method: str
    status: str  # "compressed" | "skipped"
    bytes_before: int  # fp32 weight bytes
    bytes_after: int  # stored bytes (= bytes_before when skipped)
    rel_error: float | None = None  # ||W - W_hat||_F / ||W||_F of what is stored
    fit_seconds: float = 0.0
    reason: str = ""  # why skipped, or why this method (auto)
    settings: dict = field(default_factory=dict)  # q, m, state_bits, rank, bits, ...


@dataclass
class Report:
    layers: list[LayerRecord] = field(default_factory=list)
    output_error: float | None = None  # relative error of model outputs on the example inputs
    # every parameter, buffer and initializer of the whole model, not just the layers above
    model_bytes_before: int | None = None
    refine: dict | None = None  # refinement outcome (held-out errors, steps done / planned), when it ran
    # data-free preprocessing: BatchNorms folded / kept (with reasons), dead channels, equalised pairs,
    # bias-corrected layers (riem_compiler/passes/preprocess.py); None when none ran
    preprocess: dict | None = None
    # method="auto": the plan (objective, plans compared and their measured output errors, per layer the
    # candidates with their errors and costs, the sensitivity measurements), see passes/auto.AutoResult
    auto: dict | None = None

    @property
    def model_bytes_after(self) -> int | None:
        if self.model_bytes_before is None:
            return None
        return self.model_bytes_before - sum(r.bytes_before - r.bytes_after for r in self.compressed)

    @property
    def model_ratio(self) -> float | None:
        if not self.model_bytes_before:
            return None
        return self.model_bytes_after / self.model_bytes_before

    @property
    def time_capped(self) -> list[LayerRecord]:
        """Layers whose fit a time budget stopped early (worse than a full fit, load-dependent)."""
        return [r for r in self.layers if r.settings.get("time_capped")]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    @property
    def compressed(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.status == "compressed"]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    @property
    def fit_seconds(self) -> float:
        return sum(r.fit_seconds for r in self.layers)

    def totals(self) -> dict:
        return {"layers": len(self.layers), "compressed": len(self.compressed),
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "ratio": round(self.ratio, 6), "fit_seconds": round(self.fit_seconds, 3),
                "output_error": self.output_error, "model_bytes_before": self.model_bytes_before,
                "model_bytes_after": self.model_bytes_after,
                "model_ratio": None if self.model_ratio is None else round(self.model_ratio, 6),
                "time_capped_layers": len(self.time_capped)}

    def to_dict(self) -> dict:
        data = {"layers": [asdict(r) for r in self.layers], "totals": self.totals()}
        if self.refine is not None:
            data["refine"] = self.refine
        if self.preprocess is not None:
            data["preprocess"] = self.preprocess
        if self.auto is not None:
            data["auto"] = self.auto
        return data

    def to_json(self, path=None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        layers = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in data["layers"]]
        totals = data.get("totals", {})
        return cls(layers, totals.get("output_error"), totals.get("model_bytes_before"), data.get("refine"),
                   data.get("preprocess"), data.get("auto"))

    def rows(self) -> list[list[str]]:
        rows = []
        for r in self.layers:
            err = "-" if r.rel_error is None else f"{r.rel_error:.4f}"
            # onnx_note (why a layer got its ONNX form) is one sentence per layer: report.json has it
            setting = " ".join(f"{k}={v}" for k, v in r.settings.items() if k != "onnx_note")
            rows.append([r.name, "x".join(map(str, r.shape)), r.method if r.status == "compressed" else "kept",
                         setting, _kib(r.bytes_before), _kib(r.bytes_after), err, f"{r.fit_seconds:.1f}",
                         r.reason])
        t = self.totals()
        rows.append(["TOTAL", f"{t['compressed']}/{t['layers']} layers", "", f"ratio={t['ratio']:.4f}",
                     _kib(t["bytes_before"]), _kib(t["bytes_after"]), "", f"{t['fit_seconds']:.1f}",
                     "" if self.output_error is None else f"output error {self.output_error:.4f}"])
        plan_for = (self.auto or {}).get("plan_for")
        if plan_for:
            rows.append(["PLANNED FOR", plan_for, "auto", "", "", "", "", "",
                         f"only candidates {plan_for} runs compressed; KiB after = run-time weight bytes there"])
        folded = (self.preprocess or {}).get("batchnorm", {})
        if folded:
            rows.append(["BATCHNORM", f"{len(folded['folded'])} folded", "", f"{len(folded['kept'])} kept",
                         "", "", "", "", "; ".join(f"{n}: {r}" for n, r in folded["kept"][:3])])
        if self.model_bytes_before is not None:
            rows.append(["WHOLE MODEL", "all tensors", "", f"ratio={self.model_ratio:.4f}",
                         _kib(self.model_bytes_before), _kib(self.model_bytes_after), "", "",
                         "weights, biases, norms, embeddings and everything else stored"])
        return rows

    HEADER = ["layer", "shape", "method", "settings", "KiB before", "KiB after", "rel.err", "fit s", "note"]

    def __str__(self) -> str:
        rows = [self.HEADER] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADER))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows()]
        return "\n".join(lines)


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"
