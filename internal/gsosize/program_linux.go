package gsosize

import (
	"encoding/binary"

	"github.com/cilium/ebpf/asm"
)

// Offsets in struct __sk_buff (include/uapi/linux/bpf.h: a stable ABI;
// TestSkBuffOffsets checks them against the running kernel's BTF).
const (
	skbMark    = 8
	skbGSOSize = 176
)

const (
	hdrStartNet = 1  // BPF_HDR_START_NET: offsets from the network header
	tcxNext     = -1 // TCX_NEXT: let the next program (or none) decide
	udpProto    = 17
)

// instructions is the program for data port port: for a packet whose
// gso_size is set, whose mark is 0, and which is a UDP packet from or to
// port (IPv4 with any header length, or IPv6 with UDP as the first next
// header), set the mark to Mark(gso_size). It never changes the packet
// and always lets it go on.
func instructions(port uint16) asm.Instructions {
	// A port as the 16-bit load from the packet's bytes reads it.
	var be [2]byte
	binary.BigEndian.PutUint16(be[:], port)
	p := int32(binary.NativeEndian.Uint16(be[:]))
	const buf = -32 // the first 20 bytes of the network header
	const ports = -8
	ins := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R9, asm.R6, skbGSOSize, asm.Word),
		asm.JEq.Imm(asm.R9, 0, "out"),
		asm.JGT.Imm(asm.R9, 0xffff, "out"),
		asm.LoadMem(asm.R2, asm.R6, skbMark, asm.Word),
		asm.JNE.Imm(asm.R2, 0, "out"),
		// The first 20 bytes of the network header: all of an IPv4
		// header but its options, and of IPv6 as far as the next header.
		// The helper reads the packet's linear part, where the stack
		// keeps the headers of every run it makes or coalesces.
		asm.Mov.Imm(asm.R2, 0),
	}
	ins = append(ins, loadNet(buf, 20)...)
	ins = append(ins,
		asm.LoadMem(asm.R2, asm.RFP, buf, asm.Byte),
		asm.Mov.Reg(asm.R3, asm.R2),
		asm.RSh.Imm(asm.R3, 4),
		asm.JEq.Imm(asm.R3, 4, "v4"),
		asm.JEq.Imm(asm.R3, 6, "v6"),
		asm.Ja.Label("out"),
		// IPv4: protocol at 9, the UDP header after IHL words.
		asm.LoadMem(asm.R3, asm.RFP, buf+9, asm.Byte).WithSymbol("v4"),
		asm.JNE.Imm(asm.R3, udpProto, "out"),
		asm.And.Imm(asm.R2, 0x0f),
		asm.LSh.Imm(asm.R2, 2),
		asm.JLT.Imm(asm.R2, 20, "out"),
		asm.Ja.Label("ports"),
		// IPv6: next header at 6, the UDP header at 40.
		asm.LoadMem(asm.R3, asm.RFP, buf+6, asm.Byte).WithSymbol("v6"),
		asm.JNE.Imm(asm.R3, udpProto, "out"),
		asm.Mov.Imm(asm.R2, 40),
	)
	// The UDP ports (R2 is their offset).
	load := loadNet(ports, 4)
	load[0] = load[0].WithSymbol("ports")
	ins = append(ins, load...)
	return append(ins,
		asm.LoadMem(asm.R2, asm.RFP, ports, asm.Half),
		asm.JEq.Imm(asm.R2, p, "mark"),
		asm.LoadMem(asm.R2, asm.RFP, ports+2, asm.Half),
		asm.JEq.Imm(asm.R2, p, "mark"),
		asm.Ja.Label("out"),
		asm.Or.Imm32(asm.R9, Tag<<16-1<<32).WithSymbol("mark"),
		asm.StoreMem(asm.R6, skbMark, asm.R9, asm.Word),
		asm.Mov.Imm(asm.R0, tcxNext).WithSymbol("out"),
		asm.Return(),
	)
}

// loadNet reads n bytes of the packet from the offset in R2, counted from
// the network header, onto the stack at the frame offset at (the skb is
// in R6), and jumps to "out" when they are not there.
func loadNet(at, n int32) asm.Instructions {
	return asm.Instructions{
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, at),
		asm.Mov.Imm(asm.R4, n),
		asm.Mov.Imm(asm.R5, hdrStartNet),
		asm.FnSkbLoadBytesRelative.Call(),
		asm.JNE.Imm(asm.R0, 0, "out"),
	}
}
