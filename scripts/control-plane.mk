# Local Kubernetes 1.20 control plane (etcd + kube-apiserver + kube-controller-manager)
# for the integration test tier. Included from the top-level Makefile.
#
#   make control-plane        build the binaries if not cached (~7 min once, cold), then start
#   make control-plane-down   stop it and remove its state dir
#
# Afterwards: eval "$$(scripts/control-plane.sh env)" to point kubectl at it.
# Binaries are cached in $${FINETUNE_CACHE:-$$HOME/.cache/finetune}/k8s-1.20.2/bin, kubectl v1.20.2
# included: the tests run that one, not the host's (tests/kubectl.py).

CONTROL_PLANE_SCRIPTS := $(dir $(lastword $(MAKEFILE_LIST)))

.PHONY: control-plane control-plane-down k8s-binaries

k8s-binaries:
	bash $(CONTROL_PLANE_SCRIPTS)k8s-build.sh

control-plane: k8s-binaries
	bash $(CONTROL_PLANE_SCRIPTS)control-plane.sh up

control-plane-down:
	bash $(CONTROL_PLANE_SCRIPTS)control-plane.sh down
