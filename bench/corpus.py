"""Write the malicious/broken bundle corpus (tests/corpus.py) to disk and print its table.

    python -m bench.corpus OUT_DIR [--key KEY] [--rogue-key KEY]

For every case, ``OUT_DIR/<case>/`` holds the retained messages in publish order
(``NN-<topic with / as _>.bin``) and ``case.json`` (layer, attack, expected phase and reason
words). Without ``--key`` a fresh trusted/rogue key pair is generated under ``OUT_DIR/keys``
(give the trusted ``.pub`` to the device under test). The table lists the expected refusal of
each case; tests/test_corpus.py checks them against a running device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from corpus import build_corpus

from edge_runtime.bundle import generate_keypair


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--key", type=Path, help="trusted Ed25519 private key (PEM)")
    parser.add_argument("--rogue-key", type=Path, help="an untrusted Ed25519 private key (PEM)")
    parser.add_argument("--fleet", default="test")
    parser.add_argument("--group", default="cams")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    key = args.key or generate_keypair(out / "keys", "trusted")[0]
    rogue = args.rogue_key or generate_keypair(out / "keys", "rogue")[0]
    cases = build_corpus(out / ".work", key, rogue, fleet=args.fleet, group=args.group)
    rows = []
    for case in cases:
        folder = out / case.name
        folder.mkdir(exist_ok=True)
        for i, (topic, payload) in enumerate([*case.messages, *case.repair]):
            (folder / f"{i:02d}-{topic.replace('/', '_')}.bin").write_bytes(payload)
        meta = {
            "layer": case.layer,
            "attack": case.attack,
            "phase": case.phase,
            "reason_words": list(case.reason),
            "log_words": case.log_words,
            "topics": [t for t, _ in case.messages],
            "repair_topics": [t for t, _ in case.repair],
        }
        (folder / "case.json").write_text(json.dumps(meta, indent=1) + "\n")
        words = " / ".join(case.reason) or case.log_words
        rows.append((case.name, case.layer, case.phase, f"{case.bytes_published / 1024:.0f}", words))
    widths = [max(len(r[i]) for r in [*rows, ("case", "layer", "phase", "KiB", "")]) for i in range(4)]
    head = ("case", "layer", "phase", "KiB")
    print(
        "  ".join(f"{h:>{w}}" if h == "KiB" else f"{h:{w}}" for h, w in zip(head, widths, strict=True)),
        end="",
    )
    print("  reason words")
    for name, layer, phase, kib, words in rows:
        print(f"{name:{widths[0]}}  {layer:{widths[1]}}  {phase:{widths[2]}}  {kib:>{widths[3]}}  {words}")
    print(f"\n{len(cases)} cases written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
