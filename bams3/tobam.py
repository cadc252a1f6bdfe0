"""Child process: parse SAM/CRAM (or anything htslib reads) and write uncompressed BAM to stdout.

Used by :mod:`bams3.inputs` so that text parsing runs on another core. Errors become one
line on stderr and exit status 2.

htslib's own messages (``[E::sam_parse1] ...``, ``[W::sam_read1_sam] Parse error at line N``)
go to a private log file instead of stderr; the one error line is composed from them, as
samtools would report it (line number and what is wrong). A reference name missing from the
header, which htslib turns into an unmapped record with a warning, is an error here: the
conversion would otherwise lose the record's placement.
"""

import argparse
import os
import re
import sys
import tempfile

_LOG_LIMIT = 1 << 20  # the log is emptied when it grows past this (only warnings accumulate)
_UNKNOWN_REF = re.compile(r'unrecognized (mate )?reference name "?([^";\n]*)"?')


class ParseFailure(Exception):
    """One line saying what is wrong with the input."""


class HtslibLog:
    """htslib's stderr (fd 2) redirected to a temporary file we can read back."""

    def __init__(self):
        self.real_stderr = os.fdopen(os.dup(2), "w")
        self._f = tempfile.TemporaryFile()
        os.dup2(self._f.fileno(), 2)
        self.pos = 0

    def grew(self) -> bool:
        return os.lseek(2, 0, os.SEEK_CUR) != self.pos

    def new_text(self) -> str:
        end = os.lseek(2, 0, os.SEEK_CUR)
        text = os.pread(2, max(0, end - self.pos), self.pos).decode(errors="replace")
        self.pos = end
        if end > _LOG_LIMIT:
            os.ftruncate(2, 0)
            os.lseek(2, 0, os.SEEK_SET)
            self.pos = 0
        return text

    def all_text(self) -> str:
        end = os.lseek(2, 0, os.SEEK_CUR)
        return os.pread(2, min(end, _LOG_LIMIT), 0).decode(errors="replace")


def describe_failure(log: str, exc: BaseException, is_sam: bool) -> str:
    """The one line for a failed read, from htslib's log and the exception pysam raised."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [re.sub(r"^\[E::[^\]]*\]\s*", "", ln) for ln in lines if ln.startswith("[E::")]
    line_no = None
    for ln in lines:
        m = re.search(r"Parse error at line (\d+)", ln)
        if m:
            line_no = int(m.group(1))
    what = errors[-1] if errors else None
    if line_no is not None:
        return f"cannot parse SAM line {line_no}: {what or 'malformed record (a field is missing or not a number)'}"
    if any("cram_get_ref" in ln or "reference" in ln.lower() and "cram" in ln.lower() for ln in lines):
        names = re.findall(r'Failed to populate reference "([^"]*)"', log)
        which = f"the reference sequence of {names[0]!r}" if names else "its reference sequence"
        return (f"cannot decode CRAM: {which} is not available (give the FASTA with --reference, "
                "or set REF_PATH/REF_CACHE)")
    if what:
        return f"cannot parse input: {what}"
    msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return f"cannot parse input: {msg}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bams3-tobam")
    ap.add_argument("input")
    ap.add_argument("--reference")
    args = ap.parse_args(argv)
    import pysam

    log = HtslibLog()
    pysam.set_verbosity(3)  # errors and warnings, into the log
    is_sam = False
    try:
        kw = {"reference_filename": args.reference} if args.reference else {}
        with pysam.AlignmentFile(args.input, "r", check_sq=False, **kw) as inp:
            is_sam = not (inp.is_bam or inp.is_cram)
            head_lines = sum(1 for ln in str(inp.header).split("\n") if ln.startswith("@")) if is_sam else 0
            with pysam.AlignmentFile("-", "wbu", template=inp) as out:
                _copy(inp, out, log, is_sam, head_lines)
    except BrokenPipeError:
        return 1
    except ParseFailure as e:
        print(str(e), file=log.real_stderr, flush=True)
        return 2
    except (ValueError, OSError) as e:
        print(describe_failure(log.all_text(), e, is_sam), file=log.real_stderr, flush=True)
        return 2
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    return 0


def _copy(inp, out, log: HtslibLog, is_sam: bool, head_lines: int) -> None:
    # next() rather than iteration: pysam refuses to iterate over a SAM file without @SQ lines
    nxt, write = inp.__next__, out.write
    n = 0
    while True:
        try:
            rec = nxt()
        except StopIteration:
            return
        n += 1
        if (rec.reference_id < 0 or rec.next_reference_id < 0) and log.grew():
            m = _UNKNOWN_REF.search(log.new_text())
            if m:
                where = f"SAM line {head_lines + n}" if is_sam else f"record {n}"
                field = "RNEXT" if m.group(1) else "RNAME"
                raise ParseFailure(f"{where}: reference {m.group(2)!r} ({field}) is not in the header "
                                   "(no @SQ line for it)")
        write(rec)


if __name__ == "__main__":
    sys.exit(main())
