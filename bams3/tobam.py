"""Child process: parse SAM/CRAM (or anything htslib reads) and write uncompressed BAM to stdout.

Used by :mod:`bams3.inputs` so that text parsing runs on another core. Errors become one
line on stderr and exit status 2.
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bams3-tobam")
    ap.add_argument("input")
    ap.add_argument("--reference")
    args = ap.parse_args(argv)
    import pysam

    pysam.set_verbosity(0)
    try:
        kw = {"reference_filename": args.reference} if args.reference else {}
        with pysam.AlignmentFile(args.input, "r", check_sq=False, **kw) as inp:
            with pysam.AlignmentFile("-", "wbu", template=inp) as out:
                for rec in inp:
                    out.write(rec)
    except BrokenPipeError:
        return 1
    except (ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"cannot parse input: {msg}", file=sys.stderr)
        return 2
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
