"""Shards on a Dask cluster (``bams3 convert --dask local:N`` or ``--dask tcp://host:8786``).

The shards are :func:`bams3.stages.run_shard` calls on plain values, so a Dask worker runs
them as well as a thread: each opens the input (a path it must be able to read) and the store
(S3 credentials from its own environment). The lease, the verification and the commit stay
in this process. ``distributed`` is an optional dependency (``pip install 'bams3[dask]'``).
"""

from __future__ import annotations

import os
import sys

from .errors import InputError


def parse_dask(spec: str) -> tuple[str, int | None]:
    """``local[:N]`` -> ("local", N or None); ``tcp://host:port`` (any scheme) -> (address, None)."""
    if spec == "local" or spec.startswith("local:"):
        n = spec.partition(":")[2]
        if n and (not n.isdigit() or int(n) < 1):
            raise InputError(f"--dask {spec}: expected local:N with N >= 1 workers")
        return "local", int(n) if n else None
    if "://" not in spec:
        raise InputError(f"--dask {spec}: expected local:N or a scheduler address such as tcp://host:8786")
    return spec, None


def _warm_up() -> None:
    """Load what a shard needs (modules, the quality coder's compiled kernels) on a worker."""
    import numpy as np

    from bams3 import stages  # noqa: F401
    from bams3core.qualcodec import decode_quals, encode_quals

    lengths = np.array([4], dtype=np.uint32)
    decode_quals(encode_quals(np.array([30, 31, 32, 33], dtype=np.uint8), lengths), lengths)


class DaskShards:
    """A Dask client (and the LocalCluster it started, if any) as a shard runner."""

    def __init__(self, spec: str, *, threads_per_worker: int = 1):
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise InputError("--dask needs the distributed package: pip install 'bams3[dask]'") from None
        where, n = parse_dask(spec)
        self.cluster = None
        if where == "local":
            self.cluster = LocalCluster(n_workers=n or os.cpu_count() or 1, threads_per_worker=threads_per_worker,
                                        processes=True, dashboard_address=":0")
            self.client = Client(self.cluster)
        else:
            try:
                self.client = Client(where, timeout="20s")
            except (OSError, TimeoutError) as e:
                raise InputError(f"--dask {spec}: cannot reach the scheduler ({e})") from None

        self.client.run(_warm_up)  # imports and JIT caches, on every worker at once, before the clock runs

    @property
    def workers(self) -> int:
        return max(1, len(self.client.scheduler_info().get("workers", {})))

    def __call__(self, jobs: list, *, store, inp, opts) -> list:
        from distributed import as_completed

        from .convert import local_runner
        from .stages import run_shard

        local = [j for j in jobs if j.kind == "stream" and inp is not None]  # an open stream stays here
        remote = [j for j in jobs if j not in local]
        futs = self.client.map(run_shard, remote, pure=False, key=[f"bams3-shard-{j.run_id}-{j.number}" for j in remote])
        out = local_runner(local, store=store, inp=inp, opts=opts) if local else []
        done_records = 0
        for fut in as_completed(futs):
            res = fut.result()
            out.append(res)
            done_records += res.n_records
            if opts.progress:
                print(f"bams3: shard {res.number + 1}/{len(jobs)}: {res.n_records} records in {len(res.chunks)} "
                      f"chunks ({res.reused_chunks} reused), {res.seconds:.1f} s; total {done_records} records",
                      file=sys.stderr, flush=True)
        return out

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
