"""Print one line per record of predictions.jsonl files: method, task, length, score, prediction."""
import json
import sys

for path in sys.argv[1:]:
    for line in open(path, encoding="utf-8"):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        pred = r["prediction"].replace("\n", " ")[:70]
        print(f"{r['method']:14s} {r['task']:16s} {r['length']:6d} {r['sample_id'][-1]} score={r['score']:.2f} "
              f"pre={r['prefill_seconds']:.0f}s ans={r['answers']} pred={pred!r}")
