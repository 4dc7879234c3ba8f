# Local single-node Kubernetes 1.20 cluster (kubelet + containerd + kube-proxy + an S3 server) for
# the e2e tier and the demo, and the images it runs. Included from the top-level Makefile.
#
#   make cluster        start it (idempotent; builds the Kubernetes binaries once if not cached),
#                       then build + import the images
#   make images         (re)build the pause, finetune-trainer and finetune-operator images without
#                       Docker and import them into the running cluster (first build 3-10 min, then seconds)
#   make operator-image just the slim operator image (+ import)
#   make trainer-gpu-image  the GPU trainer image finetune-trainer:<version>-cuda (CUDA torch from PyPI, several
#                       GB), built and checked on demand only, never by `make cluster`/`make images`/`make test`;
#                       not imported (FINETUNE_IMPORT_GPU_IMAGE=1 imports it). docs/images.md
#   make image-sizes    each cached image's size, unpacked and compressed (gzip), as docs/local-cluster.md lists
#   make cluster-down   stop it and remove everything it made on the host (images stay cached)
#
# Afterwards: eval "$$(scripts/cluster.sh env)" for KUBECONFIG and FINETUNE_S3_ENDPOINT.
# See docs/local-cluster.md.

CLUSTER_SCRIPTS := $(dir $(lastword $(MAKEFILE_LIST)))

.PHONY: cluster cluster-down cluster-status images operator-image trainer-gpu-image image-sizes

cluster: venv
	bash $(CLUSTER_SCRIPTS)cluster.sh up
	bash $(CLUSTER_SCRIPTS)images/build.sh

images: venv
	bash $(CLUSTER_SCRIPTS)images/build.sh

operator-image: venv
	bash $(CLUSTER_SCRIPTS)images/build.sh operator

trainer-gpu-image: venv
	bash $(CLUSTER_SCRIPTS)images/build.sh trainer-gpu

image-sizes: venv
	bash $(CLUSTER_SCRIPTS)images/build.sh sizes

cluster-down:
	bash $(CLUSTER_SCRIPTS)cluster.sh down

cluster-status:
	bash $(CLUSTER_SCRIPTS)cluster.sh status
