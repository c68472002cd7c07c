"""What a pass did to a graph: every candidate site, rewritten or skipped with the reason, and MACs.

MACs (multiply-accumulates) before a rewrite come from the site's shapes; after a focus rewrite they
count the outputs actually active on the example inputs, so they are only known for real inputs: with
fake inputs they are ``None`` and print as "n/a" (never an invented number). A FLOP in
torch.utils.flop_counter is 2 MACs.
"""
import dataclasses
import json
from typing import Any, Dict, List, Optional

STATUSES = ("rewritten", "skipped")


@dataclasses.dataclass
class SiteReport:
    """One candidate node: its name (module fqn or node name), a short description of the op, and the outcome."""

    name: str
    op: str
    status: str
    reason: str = ""
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None
    pass_name: str = ""
    error: Optional[float] = None  # relative output error of the rewritten op on the example inputs (shift pass)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"fxeff.report.SiteReport: status must be one of {STATUSES}, got {self.status!r}")
        if self.status == "skipped" and not self.reason:
            raise ValueError(f"fxeff.report.SiteReport: a skipped site needs a reason ({self.name!r})")


def _fmt_macs(macs: Optional[int]) -> str:
    if macs is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(macs) >= scale:
            return f"{macs / scale:.2f}{unit}"
    return str(macs)


def _sum(values: List[Optional[int]]) -> Optional[int]:
    return None if any(v is None for v in values) else int(sum(values))


@dataclasses.dataclass
class Report:
    """The outcome of ``run_passes``: one SiteReport per candidate node plus what the pass measured.

    ``aoi_fractions``: the fraction of active pixels per image of the example inputs (focus pass;
    None with fake inputs or for passes without an AoI). ``model_macs_before/after``: the whole
    graph's MACs from FlopCounterMode (None where not measurable).
    """

    pass_name: str
    sites: List[SiteReport] = dataclasses.field(default_factory=list)
    aoi_fractions: Optional[List[float]] = None
    split: Optional[str] = None
    model_macs_before: Optional[int] = None
    model_macs_after: Optional[int] = None
    notes: List[str] = dataclasses.field(default_factory=list)

    @property
    def rewritten(self) -> List[SiteReport]:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def skipped(self) -> List[SiteReport]:
        return [s for s in self.sites if s.status == "skipped"]

    @property
    def macs_before(self) -> Optional[int]:
        """Total MACs of the candidate sites before the rewrite."""
        return _sum([s.macs_before for s in self.sites])

    @property
    def macs_after(self) -> Optional[int]:
        """Total MACs of the candidate sites after the rewrite (None when any site's is unknown)."""
        return _sum([s.macs_after for s in self.sites])

    @property
    def mac_ratio(self) -> Optional[float]:
        """macs_after / macs_before over the candidate sites (None when unknown)."""
        before, after = self.macs_before, self.macs_after
        if before is None or after is None or before == 0:
            return None
        return after / before

    @property
    def aoi_fraction(self) -> Optional[float]:
        """Mean AoI fraction over the example images (None when unknown)."""
        if not self.aoi_fractions:
            return None
        return sum(self.aoi_fractions) / len(self.aoi_fractions)

    def site(self, name: str) -> SiteReport:
        """The site named ``name`` (KeyError naming the known sites otherwise)."""
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"fxeff.report.Report: no site named {name!r}; sites: {[s.name for s in self.sites]}")

    def merge(self, other: "Report") -> "Report":
        """One report for several passes run one after the other (sites in order, notes joined)."""
        return Report(
            pass_name=f"{self.pass_name}+{other.pass_name}" if self.pass_name else other.pass_name,
            sites=self.sites + other.sites,
            aoi_fractions=other.aoi_fractions if other.aoi_fractions is not None else self.aoi_fractions,
            split=other.split if other.split is not None else self.split,
            model_macs_before=self.model_macs_before if self.model_macs_before is not None else other.model_macs_before,
            model_macs_after=other.model_macs_after,
            notes=self.notes + other.notes,
        )

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict: the fields, the sites, and the totals."""
        d = dataclasses.asdict(self)
        d.update(macs_before=self.macs_before, macs_after=self.macs_after, mac_ratio=self.mac_ratio,
                 aoi_fraction=self.aoi_fraction)
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        header = ("site", "op", "status", "MACs before", "MACs after", "reason")
        rows = [(s.name, s.op, s.status, _fmt_macs(s.macs_before), _fmt_macs(s.macs_after), s.reason)
                for s in self.sites]
        if any(s.error is not None for s in self.sites):  # only passes that approximate report an error column
            header = header[:-1] + ("rel. error", header[-1])
            rows = [r[:-1] + ("n/a" if s.error is None else f"{s.error:.4f}", r[-1]) for r, s in zip(rows, self.sites)]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header[:-1])]

        def line(r):
            return "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + ("  " + r[-1] if r[-1] else "")

        out = [f"fxeff report: pass {self.pass_name}"]
        if self.split is not None:
            out.append(f"AoI split: {self.split}")
        if self.aoi_fractions is not None:
            fractions = ", ".join(f"{f:.1%}" for f in self.aoi_fractions)
            out.append(f"AoI fraction per example image: {fractions} (mean {self.aoi_fraction:.1%})")
        elif self.pass_name.startswith("focus") or "+focus" in self.pass_name:
            out.append("AoI fraction: n/a (example inputs carry no values)")
        out.append(line(header))
        out.extend(line(r) for r in rows)
        ratio = self.mac_ratio
        out.append(f"sites: {len(self.rewritten)} rewritten, {len(self.skipped)} skipped; "
                   f"MACs of the sites {_fmt_macs(self.macs_before)} -> {_fmt_macs(self.macs_after)}"
                   + (f" (ratio {ratio:.3f})" if ratio is not None else " (ratio n/a)"))
        if self.model_macs_before is not None:
            model_ratio = (self.model_macs_after / self.model_macs_before
                           if self.model_macs_after is not None and self.model_macs_before else None)
            out.append(f"whole model MACs {_fmt_macs(self.model_macs_before)} -> {_fmt_macs(self.model_macs_after)}"
                       + (f" (ratio {model_ratio:.3f})" if model_ratio is not None else " (ratio n/a)"))
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)
