"""Pretrained files on the command line (see `structvpr_jax.models.weights`).

  python -m structvpr_jax.weights fetch [imagenet] [segmenter]
      caches the files (download + SHA-256 check where they are not on this
      machine yet) and prints each cached path
  python -m structvpr_jax.weights where
      prints where each file would be taken from now, without downloading

$STRUCTVPR_WEIGHTS_URL replaces the download base URL (a mirror or an
air-gapped copy serving the same file names); $XDG_CACHE_HOME moves the cache.
"""

from __future__ import annotations

import argparse
import sys

from structvpr_jax.models import weights


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m structvpr_jax.weights", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  fetch = sub.add_parser("fetch", help="cache the pretrained files, downloading what is missing")
  fetch.add_argument("keys", nargs="*", metavar="KEY",
                     help=f"files to fetch, of {sorted(weights.FILES)} (default: all)")
  sub.add_parser("where", help="where each file would be taken from now (no download)")
  args = parser.parse_args(argv)
  try:
    if args.command == "fetch":
      for key, path in weights.fetch(args.keys or None, progress=True).items():
        print(f"{key}: {path} (sha256 {weights.FILES[key].sha256[:12]}... ok)")
    else:
      for key, wf in sorted(weights.FILES.items()):
        path = weights.find(key, download=False)
        where = path or f"not on this machine (would download {weights.base_url()}/{wf.name})"
        print(f"{key}: {where}")
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
