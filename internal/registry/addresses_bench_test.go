package registry

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/enclavekeys/enclave/internal/ca"
)

// BenchmarkAddClientsWithBlock: the cost of registering n clients in an
// enclave whose address block hands each the lowest free address (issue
// 36: each add scanned every device and token for every address it tried,
// n³ for n adds, before it collected the held addresses once).
func BenchmarkAddClientsWithBlock(b *testing.B) {
	for _, n := range []int{500, 2000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			for range b.N {
				s := &State{}
				if err := s.AddEnclave(7, "db"); err != nil {
					b.Fatal(err)
				}
				if err := s.SetAddresses(7, netip.MustParsePrefix("100.64.0.0/16"), netip.MustParsePrefix("100.64.0.0/16")); err != nil {
					b.Fatal(err)
				}
				for i := range n {
					if err := s.AddDevice(Device{Name: fmt.Sprintf("c%d", i), Role: ca.RoleClient, Enclave: 7}); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}
