#!/usr/bin/env bash
# Submit and watch the Kubernetes jobs of this repository (the image: see ../Dockerfile).
#   NAMESPACE=me IMAGE=registry.example.com/nanollm:v1 k8s/deploy.sh pretrain
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAMESPACE="${NAMESPACE:-default}"
IMAGE="${IMAGE:-nanollm:latest}"  # the manifests say nanollm:latest; this replaces it

usage() {
    cat >&2 <<USAGE
usage: $(basename "$0") pretrain|rl|status|logs [pretrain|rl]

  pretrain   apply k8s/pretrain-job.yaml: PVC + data preparation + train.py config/a100_2day.py
  rl         apply k8s/grpo-job.yaml: grpo.py config/usmle.py from the pretraining checkpoint on the PVC
  status     the PVC, jobs and pods of this project
  logs       follow a job's logs (default: pretrain; 'logs rl' for GRPO)

environment: NAMESPACE (now: $NAMESPACE), IMAGE (now: $IMAGE).
k8s/secrets.yaml (from secrets.yaml.template, with HF_TOKEN) is applied first when it exists.
Build and push the image first:  docker build -t \$IMAGE . && docker push \$IMAGE
A Job cannot be changed once submitted: kubectl -n \$NAMESPACE delete job nanollm-pretrain, then submit again
(the PVC keeps the data and checkpoints, and the new pod resumes).
USAGE
    exit 2
}

submit() {  # the manifest with the chosen image, into the namespace
    if [ -f "$HERE/secrets.yaml" ]; then
        kubectl apply -n "$NAMESPACE" -f "$HERE/secrets.yaml"
    fi
    sed "s|image: nanollm:latest|image: $IMAGE|" "$HERE/$1" | kubectl apply -n "$NAMESPACE" -f -
    echo "submitted $1 to namespace $NAMESPACE with image $IMAGE; follow it with: $0 logs ${2}"
}

job_name() {
    case "${1:-pretrain}" in
        pretrain) echo nanollm-pretrain ;;
        rl) echo nanollm-grpo ;;
        *) usage ;;
    esac
}

[ $# -ge 1 ] || usage
case "$1" in pretrain|rl|status|logs) ;; *) usage ;; esac
command -v kubectl >/dev/null || { echo "deploy.sh: kubectl not found on PATH" >&2; exit 1; }
case "$1" in
    pretrain) submit pretrain-job.yaml pretrain ;;
    rl) submit grpo-job.yaml rl ;;
    status) kubectl get pvc,jobs,pods -n "$NAMESPACE" -l app=nanollm -o wide ;;
    logs) JOB="$(job_name "${2:-pretrain}")"; kubectl logs -f -n "$NAMESPACE" "job/$JOB" --all-containers=true ;;
    *) usage ;;
esac
