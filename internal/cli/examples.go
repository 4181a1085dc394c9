package cli

import "github.com/spf13/cobra"

// examples are the Examples of --help, by command path, for the commands
// that do not carry their own in Long (TestEveryCommandHasExamples holds
// every runnable command to having some). They are kept in one place so
// that they read alike.
var examples = map[string]string{
	"enclave admin device add": `  A="enclave admin --keyserver 127.0.0.1:7443 --ca ca/ca.crt --cert certs/alice.crt --key certs/alice.key"
  enclave admin device add --name web1 --role server --enclave 3 --server-id 258
  enclave admin device add --name laptop --role client --enclave 7
  enclave admin device add --name edge --role gateway --enclave 7 --fingerprint sha256:...`,
	"enclave admin device list": `  enclave admin device list
  enclave admin device list --all --json`,
	"enclave admin device remove": `  enclave admin device revoke --name laptop && enclave admin device remove --name laptop`,
	"enclave admin device revoke": `  enclave admin device revoke --name ks-app --dry-run   # who would lose sight, which pairs rotate
  enclave admin device revoke --name laptop`,
	"enclave admin enclave add": `  enclave admin enclave add --id 3 --name web`,
	"enclave admin grant add": `  enclave admin grant add --device edge --pairs 2-3 --dry-run   # who would gain sight of what; nothing changes
  enclave admin grant add --device edge --pairs 3-7,3-9
  enclave admin grant add --device ids --all        # a monitor: every pair`,
	"enclave admin grant revoke": `  enclave admin grant revoke --device edge --pairs 3-9
  enclave admin grant revoke --device edge          # all of it`,
	"enclave admin pair allow": `  enclave admin pair allow 3-7 --dry-run
  enclave admin pair allow 3-7`,
	"enclave admin pair forbid": `  enclave admin pair forbid 3-7`,
	"enclave admin status": `  enclave admin status
  enclave admin status --json`,
	"enclave agent": `  # a server, on a TUN device (root or CAP_NET_ADMIN)
  enclave agent --ca ca/ca.crt --cert certs/web1.crt --key certs/web1.key --keyserver 192.0.2.1:7443 --listen 192.0.2.10 --tun enc0
  # a client without privileges, reaching the server through a SOCKS5 proxy
  enclave agent --ca ca/ca.crt --cert certs/laptop.crt --key certs/laptop.key --netstack --socks5 127.0.0.1:1080 --peer 100.64.3.0/24=192.0.2.10
  # the same from a file
  enclave agent --config /etc/enclave/agent.yaml`,
	"enclave audit readers": `  enclave audit readers --pair 3-7 audit.log                          # now
  enclave audit readers --pair 3-7 --at 2026-11-30T09:00:00Z audit.log
  enclave audit readers --pair 3-7 --etcd https://10.0.0.5:2379 --kek-file kek --json`,
	"enclave audit verify": `  enclave audit verify audit.log --store ks.db --kek-file kek
  enclave audit verify --etcd https://10.0.0.5:2379 --kek-file kek`,
	"enclave bench sas": `  enclave bench sas --count 100000`,
	"enclave ca init":   `  enclave ca init --dir ca --org example.org`,
	"enclave ca show":   `  enclave ca show --ca ca`,
	"enclave ca issuer": `  enclave ca issuer --ca ca --name ks1 --out issuer
  enclave keyserver ... --issuer-cert issuer/ks1.crt --issuer-key issuer/ks1.key`,
	"enclave cert issue": `  enclave cert issue --ca ca --name web1 --role server --enclave 3 --server-id 258 --ip 100.64.3.1/16 --out certs
  enclave cert issue --ca ca --name ks --role keyserver --host ks.example.org,192.0.2.1 --out certs`,
	"enclave cert sign": `  enclave cert sign --ca ca --csr web2.csr --name web2 --role server --enclave 3 --server-id 302 --ip 100.64.3.3/16 --out certs`,
	"enclave cert show": `  enclave cert show certs/web1.crt
  enclave cert show --json ca/ca.crt`,
	"enclave gateway": `  # a relay any agent can send through with --via (no root)
  enclave gateway --ca ca/ca.crt --cert certs/edge.crt --key certs/edge.key --keyserver 192.0.2.1:7443 --relay 0.0.0.0:5000 --relay-to 192.0.2.0/24 --flow-log flows.jsonl
  # inline on a router, behind an iptables NFQUEUE rule (root)
  enclave gateway --config /etc/enclave/gateway.yaml`,
	"enclave keys fetch":    `  enclave keys fetch --keyserver 127.0.0.1:7443 --ca ca/ca.crt --cert certs/web1.crt --key certs/web1.key --pairs 3-7`,
	"enclave keys generate": `  enclave keys generate --out kek`,
	"enclave keyserver": `  enclave keyserver --ca ca/ca.crt --cert certs/ks.crt --key certs/ks.key --kek-file kek --store ks.db --audit audit.log --listen 0.0.0.0:7443
  enclave keyserver --config /etc/enclave/keyserver.yaml`,
	"enclave lab": `  enclave lab
  enclave lab --faults
  sudo enclave lab --netns`,
	"enclave map": `  enclave map --keyserver 127.0.0.1:7443 --ca ca/ca.crt --cert certs/alice.crt --key certs/alice.key --out map.html
  enclave map --keyserver 127.0.0.1:7443 --ca ca/ca.crt --cert certs/alice.crt --key certs/alice.key --flows flows.jsonl --format dot
  # what if enclave 3's key server took its own enclave key (a dry run)
  enclave map --keyserver 127.0.0.1:7443 --ca ca/ca.crt --cert certs/alice.crt --key certs/alice.key --what-if-enclave-key-mode 3
  enclave map --diff monday.json friday.json --out diff.html`,
}

// addExamples sets the Examples of cmd and its subcommands from examples.
func addExamples(cmd *cobra.Command) {
	if ex, ok := examples[cmd.CommandPath()]; ok && cmd.Example == "" {
		cmd.Example = ex
	}
	for _, c := range cmd.Commands() {
		addExamples(c)
	}
}
