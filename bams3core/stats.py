"""flagstat / idxstats accumulators over record fixed fields (samtools' bam_stat.c rules).

Counts are kept in the manifest so ``bams3 stats`` needs no chunk. The JSON and text
renderings follow ``samtools flagstat [-O json]`` and ``samtools idxstats`` exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from .bam import FLAG_UNMAP

# Order and names exactly as `samtools flagstat -O json` prints them.
FLAGSTAT_FIELDS = (
    "total", "primary", "secondary", "supplementary", "duplicates", "primary duplicates",
    "mapped", "primary mapped", "paired in sequencing", "read1", "read2", "properly paired",
    "with itself and mate mapped", "singletons", "with mate mapped to a different chr",
    "with mate mapped to a different chr (mapQ >= 5)",
)
_PERCENT = {  # field -> denominator field
    "mapped": "total", "primary mapped": "primary", "properly paired": "paired in sequencing",
    "singletons": "paired in sequencing",
}


def flagstat_counts(fixed: np.ndarray) -> np.ndarray:
    """Counts[2, len(FLAGSTAT_FIELDS)] for a batch: row 0 QC-passed, row 1 QC-failed."""
    out = np.zeros((2, len(FLAGSTAT_FIELDS)), dtype=np.int64)
    if len(fixed):
        from .kernels import flagstat_kernel  # here, not at the top: importing stats must not import numba

        flagstat_kernel(fixed["flag"], fixed["mapq"], fixed["refid"], fixed["next_refid"], out)
    return out


def _pct(num: int, den: int):
    return None if den == 0 else float(f"{100.0 * num / den:.2f}")


def flagstat_json(counts) -> dict:
    """The object `samtools flagstat -O json` prints, from counts[2][fields]."""
    out = {}
    for row, label in ((0, "QC-passed reads"), (1, "QC-failed reads")):
        d = {}
        vals = dict(zip(FLAGSTAT_FIELDS, (int(v) for v in counts[row])))
        for name in FLAGSTAT_FIELDS:
            d[name] = vals[name]
            if name in _PERCENT:
                d[name + " %"] = _pct(vals[name], vals[_PERCENT[name]])
        out[label] = d
    return out


def flagstat_text(counts) -> str:
    """The text `samtools flagstat` prints."""
    p = dict(zip(FLAGSTAT_FIELDS, (int(v) for v in counts[0])))
    f = dict(zip(FLAGSTAT_FIELDS, (int(v) for v in counts[1])))

    def pc(name):
        den = _PERCENT[name]
        a = "N/A" if p[den] == 0 else f"{100.0 * p[name] / p[den]:.2f}%"
        b = "N/A" if f[den] == 0 else f"{100.0 * f[name] / f[den]:.2f}%"
        return f" ({a} : {b})"

    lines = [
        f"{p['total']} + {f['total']} in total (QC-passed reads + QC-failed reads)",
        f"{p['primary']} + {f['primary']} primary",
        f"{p['secondary']} + {f['secondary']} secondary",
        f"{p['supplementary']} + {f['supplementary']} supplementary",
        f"{p['duplicates']} + {f['duplicates']} duplicates",
        f"{p['primary duplicates']} + {f['primary duplicates']} primary duplicates",
        f"{p['mapped']} + {f['mapped']} mapped" + pc("mapped"),
        f"{p['primary mapped']} + {f['primary mapped']} primary mapped" + pc("primary mapped"),
        f"{p['paired in sequencing']} + {f['paired in sequencing']} paired in sequencing",
        f"{p['read1']} + {f['read1']} read1",
        f"{p['read2']} + {f['read2']} read2",
        f"{p['properly paired']} + {f['properly paired']} properly paired" + pc("properly paired"),
        f"{p['with itself and mate mapped']} + {f['with itself and mate mapped']} with itself and mate mapped",
        f"{p['singletons']} + {f['singletons']} singletons" + pc("singletons"),
        f"{p['with mate mapped to a different chr']} + {f['with mate mapped to a different chr']} with mate mapped to a different chr",
        f"{p['with mate mapped to a different chr (mapQ >= 5)']} + {f['with mate mapped to a different chr (mapQ >= 5)']} with mate mapped to a different chr (mapQ>=5)",
    ]
    return "\n".join(lines) + "\n"


def flagstat_json_text(counts) -> str:
    """Byte-for-byte what `samtools flagstat -O json` prints."""
    obj = flagstat_json(counts)
    parts = ["{"]
    groups = []
    for label, d in obj.items():
        items = []
        for k, v in d.items():
            if v is None:
                sv = "null"
            elif k.endswith(" %"):
                sv = f"{v:.2f}"
            else:
                sv = str(v)
            items.append(f'  {json.dumps(k)}: {sv}')
        groups.append(f' {json.dumps(label)}: {{ \n' + ", \n".join(items) + " \n }")
    parts.append(",\n".join(groups))
    parts.append("}")
    return "\n".join(parts) + "\n"


@dataclass
class StatsAccumulator:
    """Accumulates flagstat counts and per-reference idxstats over record batches."""

    n_refs: int
    flagstat: np.ndarray = field(default=None)
    mapped: np.ndarray = field(default=None)    # per ref: records with flag & 4 == 0
    unmapped: np.ndarray = field(default=None)  # per ref: unmapped records placed on it
    unplaced: int = 0                           # records with refid -1

    def __post_init__(self):
        if self.flagstat is None:
            self.flagstat = np.zeros((2, len(FLAGSTAT_FIELDS)), dtype=np.int64)
            self.mapped = np.zeros(self.n_refs, dtype=np.int64)
            self.unmapped = np.zeros(self.n_refs, dtype=np.int64)

    def add(self, fixed: np.ndarray, flagstat: np.ndarray | None = None) -> None:
        """Count ``fixed`` (its flagstat counts may be given, already computed)."""
        self.flagstat += flagstat_counts(fixed) if flagstat is None else flagstat
        refid = fixed["refid"].astype(np.int64)
        placed = refid >= 0
        unm = (fixed["flag"] & FLAG_UNMAP) != 0
        if self.n_refs:
            self.mapped += np.bincount(refid[placed & ~unm], minlength=self.n_refs)[:self.n_refs]
            self.unmapped += np.bincount(refid[placed & unm], minlength=self.n_refs)[:self.n_refs]
        self.unplaced += int(np.count_nonzero(~placed))

    def merge(self, other: "StatsAccumulator") -> None:
        self.flagstat += other.flagstat
        self.mapped += other.mapped
        self.unmapped += other.unmapped
        self.unplaced += other.unplaced


def idxstats_rows(names, lengths, mapped, unmapped, unplaced) -> list[list]:
    """Rows of `samtools idxstats`: [name, length, mapped, unmapped], then ['*', 0, 0, unplaced]."""
    rows = [[n, int(l), int(m), int(u)] for n, l, m, u in zip(names, lengths, mapped, unmapped)]
    rows.append(["*", 0, 0, int(unplaced)])
    return rows


def idxstats_text(rows) -> str:
    return "".join("\t".join(str(x) for x in r) + "\n" for r in rows)
