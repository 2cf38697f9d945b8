// Command coredns-kind is CoreDNS with exactly the plugins kubeadm's default Corefile (Kubernetes v1.37) uses, so
// it can stand in for the coredns/coredns image in an offline kind node image. The full CoreDNS binary would do
// as well but builds several times slower; a CoreDNS with fewer plugins (like ../coredns) crash-loops on
// kubeadm's Corefile with "no action found for directive 'reload'". Plugin order is CoreDNS's own (its
// directives list), not the order of these imports.
package main

import (
	_ "github.com/coredns/coredns/core/dnsserver" // the server type the plugins below register into
	"github.com/coredns/coredns/coremain"

	// kubeadm's Corefile: errors, health, ready, kubernetes, prometheus, forward, cache, loop, reload, loadbalance
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics" // the `prometheus` directive
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"

	// commonly added while debugging a cluster's DNS
	_ "github.com/coredns/coredns/plugin/log"
)

func main() {
	coremain.Run()
}
