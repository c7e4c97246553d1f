"""Write deploy/k8s/monitoring/prometheusrule.yaml from deploy/prometheus/rules.yml.

rules.yml is the single source of the alerts; the PrometheusRule carries its groups verbatim.

    python deploy/prometheus/gen_prometheusrule.py           # rewrite the PrometheusRule
    python deploy/prometheus/gen_prometheusrule.py --check   # exit 1 when it is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent
RULES = DEPLOY / "prometheus" / "rules.yml"
TARGET = DEPLOY / "k8s" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/rules.yml by deploy/prometheus/gen_prometheusrule.py: edit
# the rules there and run the script (tests/test_alerts.py fails when this file is stale).
# For the Prometheus Operator: its Prometheus must select this object (ruleSelector and
# ruleNamespaceSelector; kube-prometheus-stack selects the label release=<its Helm release>).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: gradserve
  labels:
    app.kubernetes.io/name: gradserve
    app.kubernetes.io/component: monitoring
spec:
"""


def render() -> str:
    """The PrometheusRule: the header, then rules.yml without its comment header, indented."""
    lines = RULES.read_text().splitlines()
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    return HEADER + "".join(f"  {line}\n" if line.strip() else "\n" for line in lines)


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if TARGET.read_text() != text:
            print(f"{TARGET} is stale: run python {Path(__file__).relative_to(DEPLOY.parent)}",
                  file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
