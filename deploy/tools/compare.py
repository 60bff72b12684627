"""Fails unless the chart rendered with its defaults (release `ampoule`, namespace `ampoule`)
holds exactly the objects of deploy/kubernetes/ (the Namespace and the Secret template
aside: Helm creates the namespace, the operator the Secret).

Usage: compare.py RENDERED.yaml deploy/kubernetes
"""
import os
import sys

import yaml


def objects(docs):
    out = {}
    for d in docs:
        if d:
            out[(d["kind"], d["metadata"]["name"])] = d
    return out


rendered, plain_dir = sys.argv[1:]
with open(rendered) as f:
    chart = objects(yaml.safe_load_all(f))
plain = {}
for name in sorted(os.listdir(plain_dir)):
    if name.endswith(".yaml") and name not in ("namespace.yaml", "secret.example.yaml"):
        with open(os.path.join(plain_dir, name)) as f:
            plain.update(objects(yaml.safe_load_all(f)))
if chart.keys() != plain.keys():
    sys.exit(f"the chart renders {sorted(chart)}, the manifests hold {sorted(plain)}")
for key in plain:
    if chart[key] != plain[key]:
        sys.exit(f"{key}: the chart renders\n{yaml.safe_dump(chart[key])}\nthe manifest says\n{yaml.safe_dump(plain[key])}")
print(f"the chart's defaults render the {len(plain)} objects of {plain_dir}", file=sys.stderr)
