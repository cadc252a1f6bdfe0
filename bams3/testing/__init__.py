"""Test and benchmark helpers (need the ``test`` extra: moto[server]).

:mod:`bams3.testing.s3server` runs a moto S3 server on 127.0.0.1 and a proxy in front of it that
counts requests/bytes and injects failures.
"""

from .s3server import (FaultRule, MotoServer, RequestRecord, S3Proxy, classify_s3_op,
                       start_moto_server)

__all__ = ["FaultRule", "MotoServer", "RequestRecord", "S3Proxy", "classify_s3_op",
           "start_moto_server"]
