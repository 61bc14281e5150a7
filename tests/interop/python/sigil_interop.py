#!/usr/bin/env python3
"""SPIFFE workload built on py-spiffe (the `spiffe` package).

The end-to-end tests run it against Sigil's agent, which it finds through
SPIFFE_ENDPOINT_SOCKET, and read the JSON lines it prints on stdout.

Usage:
    sigil_interop.py fetch   [--timeout S]
    sigil_interop.py bundles [--timeout S]
    sigil_interop.py watch   --updates N [--timeout S]

Every result is one JSON object per line on stdout. Errors go to stderr as
one line and the exit code is 1 (2 for a usage error).
"""

import os
import sys

# Keep gRPC's own logging off stderr; failures are reported by this script.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse
import json
import queue
import time
from datetime import datetime, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from spiffe import WorkloadApiClient, X509BundleSet, X509Svid

PROG = "sigil_interop.py"


class UsageError(Exception):
    """A bad command line (exit code 2)."""


def emit(obj) -> None:
    """Write obj as one compact JSON line on stdout and flush it."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def serial_hex(cert: x509.Certificate) -> str:
    """Serial number as lowercase hex without leading zeros."""
    return format(cert.serial_number, "x")


def unix(dt: datetime) -> int:
    return int(dt.timestamp())


def count_cas(bundle_set: X509BundleSet) -> dict:
    """Map each trust domain name to its number of X.509 authorities."""
    return {
        b.trust_domain.name: len(b.x509_authorities)
        for b in sorted(bundle_set.bundles, key=lambda b: b.trust_domain.name)
    }


# ---- chain verification ----


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if issuer's subject names cert's issuer and issuer's key signed cert."""
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def _check_validity(cert: x509.Certificate, now: datetime) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ValueError(
            "certificate {} is outside its validity period ({} .. {})".format(
                serial_hex(cert), cert.not_valid_before_utc, cert.not_valid_after_utc
            )
        )


def verify_svid(svid: X509Svid, bundle_set: X509BundleSet) -> None:
    """Check that the SVID's chain leads to a CA in its trust domain's bundle.

    Walks leaf -> intermediates and stops at the first certificate that a
    bundle CA signed. Names and signatures are checked at each step, and every
    certificate on the path (including that CA) must be currently valid.
    """
    td = svid.spiffe_id.trust_domain
    bundle = bundle_set.get_bundle_for_trust_domain(td)
    if bundle is None or not bundle.x509_authorities:
        raise ValueError(f"no X.509 bundle for trust domain {td.name}")
    roots = list(bundle.x509_authorities)
    chain = svid.cert_chain
    now = datetime.now(timezone.utc)

    for i, cert in enumerate(chain):
        _check_validity(cert, now)
        for root in roots:
            if _signed_by(cert, root):
                _check_validity(root, now)
                return
        if i + 1 == len(chain):
            break
        if not _signed_by(cert, chain[i + 1]):
            raise ValueError(f"chain certificate {i} is not signed by certificate {i + 1}")
    raise ValueError(f"SVID {svid.spiffe_id} does not chain to the {td.name} bundle")


# ---- subcommands ----


def cmd_fetch(args) -> None:
    with WorkloadApiClient() as client:
        ctx = client.fetch_x509_context(timeout=args.timeout)
    svids = []
    for svid in ctx.x509_svids:
        verify_svid(svid, ctx.x509_bundle_set)
        leaf = svid.leaf
        svids.append(
            {
                "spiffe_id": str(svid.spiffe_id),
                "hint": "",  # py-spiffe does not expose hints
                "chain_len": len(svid.cert_chain),
                "not_after": unix(leaf.not_valid_after_utc),
                "serial": serial_hex(leaf),
            }
        )
    emit({"svids": svids, "bundles": count_cas(ctx.x509_bundle_set)})


def cmd_bundles(args) -> None:
    with WorkloadApiClient() as client:
        bundle_set = client.fetch_x509_bundles(timeout=args.timeout)
    emit({"bundles": count_cas(bundle_set)})


def cmd_watch(args) -> None:
    deadline = time.monotonic() + args.timeout
    events: "queue.Queue[tuple]" = queue.Queue()
    client = WorkloadApiClient()
    # Callbacks run on the watcher thread; hand everything to this one.
    handler = client.stream_x509_contexts(
        on_success=lambda ctx: events.put(("update", ctx, time.time())),
        on_error=lambda err: events.put(("error", err, None)),
    )
    seen = 0
    try:
        while seen < args.updates:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"timed out after {args.timeout:g}s with {seen} of {args.updates} updates"
                )
            try:
                kind, value, received = events.get(timeout=remaining)
            except queue.Empty:
                continue
            if kind == "error":
                # py-spiffe calls on_error only when it has stopped watching.
                raise RuntimeError(f"watch stopped: {value}")
            leaf = value.default_svid.leaf
            emit(
                {
                    "spiffe_id": str(value.default_svid.spiffe_id),
                    "serial": serial_hex(leaf),
                    "not_before": unix(leaf.not_valid_before_utc),
                    "not_after": unix(leaf.not_valid_after_utc),
                    "received_at": int(received * 1000),
                }
            )
            seen += 1
    finally:
        handler.cancel()
        client.close()


# ---- command line ----


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse


def parse_args(argv):
    parser = _Parser(prog=PROG, description="py-spiffe interop workload")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    p = sub.add_parser("fetch", help="fetch and verify the X.509 context")
    p.add_argument("--timeout", type=_positive(float), default=20.0, help="deadline in seconds")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("bundles", help="fetch the X.509 bundles")
    p.add_argument("--timeout", type=_positive(float), default=20.0, help="deadline in seconds")
    p.set_defaults(func=cmd_bundles)

    p = sub.add_parser("watch", help="print the default SVID of each X.509 context update")
    p.add_argument("--updates", type=_positive(int), default=1, help="exit 0 after N updates")
    p.add_argument("--timeout", type=_positive(float), default=120.0, help="give up after S seconds")
    p.set_defaults(func=cmd_watch)

    return parser.parse_args(argv)


def main(argv) -> int:
    try:
        args = parse_args(argv)
        args.func(args)
        return 0
    except UsageError as err:  # already names the (sub)command
        sys.stderr.write(" ".join(str(err).split()) + "\n")
        return 2
    except KeyboardInterrupt:
        code, msg = 1, "interrupted"
    except Exception as err:  # every failure ends as one line on stderr
        code, msg = 1, f"{type(err).__name__}: {err}"
    sys.stderr.write(f"{PROG}: {' '.join(msg.split())}\n")
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
