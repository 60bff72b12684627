"""Renders deploy/helm/ampoule the way `helm template` does, for the subset of Helm's template
language the chart uses, where no `helm` binary is at hand (it is not in Debian 12, PyPI or
npm). Anything outside the subset is an error, never a silent pass:

  {{ .Values.a.b }}  {{ .Release.Name }}  {{ .Release.Namespace }}  {{ .Chart.Version }}
  {{ X | quote }}  {{ X | nindent N }}  {{ X | indent N }}  {{ toYaml X | nindent N }}
  {{ if X }} … {{ end }}   and the whitespace trimming of `{{-` and `-}}`.

Usage: render_chart.py CHART RELEASE NAMESPACE [VALUES.yaml …]  (YAML on stdout)
"""
import json
import os
import re
import sys

import yaml

TOKEN = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


class TemplateError(Exception):
    pass


def merge(base, over):
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


def lookup(ctx, path):
    if not path.startswith("."):
        raise TemplateError(f"not a field path: {path!r}")
    cur = ctx
    for part in path[1:].split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise TemplateError(f"{path}: no such value")
        cur = cur[part]
    return cur


def to_yaml(v):
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True).rstrip("\n")


def show(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        raise TemplateError("a map or list printed without toYaml")
    return str(v)


def evaluate(ctx, expr):
    stages = [s.strip() for s in expr.split("|")]
    first = stages[0].split()
    if len(first) == 2 and first[0] == "toYaml":
        value = to_yaml(lookup(ctx, first[1]))
    elif len(first) == 1 and first[0].startswith('"') and first[0].endswith('"'):
        value = json.loads(first[0])
    elif len(first) == 1:
        value = lookup(ctx, first[0])
    else:
        raise TemplateError(f"unsupported expression: {expr!r}")
    for stage in stages[1:]:
        words = stage.split()
        if words == ["quote"]:
            value = json.dumps(show(value))
        elif len(words) == 2 and words[0] in ("indent", "nindent") and words[1].isdigit():
            pad = " " * int(words[1])
            text = "\n".join(pad + line for line in show(value).split("\n"))
            value = ("\n" if words[0] == "nindent" else "") + text
        else:
            raise TemplateError(f"unsupported function: {stage!r}")
    return show(value)


def truthy(v):
    return v not in (None, False, 0, "", [], {})


def render(text, ctx):
    out, stack, pos = [], [], 0
    emitting = lambda: all(stack)
    for m in TOKEN.finditer(text):
        literal = text[pos:m.start()]
        if m.group(1):
            literal = literal.rstrip(" \t\n")
        if emitting():
            out.append(literal)
        action = m.group(2)
        if action.startswith("/*"):
            pass
        elif action.startswith("if "):
            stack.append(emitting() and truthy(lookup(ctx, action[3:].strip())))
        elif action == "end":
            if not stack:
                raise TemplateError("`end` without `if`")
            stack.pop()
        elif action.split()[0] in ("else", "range", "with", "define", "include", "template"):
            raise TemplateError(f"unsupported action: {action!r}")
        elif emitting():
            out.append(evaluate(ctx, action))
        pos = m.end()
        if m.group(3):
            rest = text[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\n"))
    if stack:
        raise TemplateError("`if` without `end`")
    out.append(text[pos:])
    return "".join(out)


def main():
    chart, release, namespace, *value_files = sys.argv[1:]
    with open(os.path.join(chart, "Chart.yaml")) as f:
        meta = yaml.safe_load(f)
    with open(os.path.join(chart, "values.yaml")) as f:
        values = yaml.safe_load(f)
    for vf in value_files:
        with open(vf) as f:
            merge(values, yaml.safe_load(f) or {})
    ctx = {
        "Values": values,
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
        "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta.get("appVersion", "")},
    }
    tdir = os.path.join(chart, "templates")
    for name in sorted(os.listdir(tdir)):
        if not name.endswith(".yaml"):
            continue
        with open(os.path.join(tdir, name)) as f:
            try:
                body = render(f.read(), ctx)
            except TemplateError as e:
                sys.exit(f"{name}: {e}")
        if body.strip():
            sys.stdout.write(f"---\n# Source: ampoule/templates/{name}\n{body.strip()}\n")


if __name__ == "__main__":
    main()
