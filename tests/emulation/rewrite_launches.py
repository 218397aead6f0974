#!/usr/bin/env python3
"""Rewrites CUDA sources so a host C++ compiler takes them (tests/emulation).

Two constructs of the device dialect are syntax, not names, so cuda_emulation.hpp cannot define
them away, and a third needs a statement after it that a macro cannot add; this script rewrites
those three, and nothing else:

  ns::kernel<T><<<grid, block, smem, stream>>>(args)
      -> ::grun_emu::launch(grid, block, smem, stream)(
             [=](const auto&... a) { ns::kernel<T>(a...); }, args)
  extern __shared__ __align__(16) unsigned char smem[];
      -> unsigned char* const smem = reinterpret_cast<unsigned char*>(::grun_emu::dynamic_shared());
  __shared__ float part[8][32];
      -> __shared__ float part[8][32]; GRUN_EMU_SHARED_REGION(part);
     (on the same line: the first thread of every CTA to reach it fills the variable with 0xFF
     bytes, as the device's shared memory holds no CTA's values for the next)

The kernel is called inside a generic lambda so that template arguments left to deduction (as a
<<<>>> launch allows) are deduced from the arguments there; it captures by copy, since the launch
may run after the launching scope has ended (a kernel named by a local pointer, on a stream whose
work waits: cuda_emulation.hpp). The arguments are evaluated once, on the launching thread, and
copied to every emulated thread, as kernel parameters are.

Usage: rewrite_launches.py OUT_DIR SRC_ROOT FILE... — each FILE (under SRC_ROOT) is written to
OUT_DIR with its path relative to SRC_ROOT kept (a .cu file as .cu.cpp, for the host compiler), only when its rewritten text changed (so an
unchanged header does not rebuild what includes it). Exits 1 naming the file when a launch's
chevrons do not close.
"""
import os
import re
import sys

DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:\s]*?)\s+(\w+)\s*\[\s*\]\s*;")
STATIC_SHARED = re.compile(r"^([ \t]*__shared__\s+[^;{}()]*?\s(\w+)\s*(?:\[[^\];]*\]\s*)*;)", re.MULTILINE)
IDENT = re.compile(r"[A-Za-z_]\w*$")


def fail(name, at, what):
    sys.exit(f"rewrite_launches.py: {name}: offset {at}: {what}")


def kernel_start(text, end, name):
    """Start of the kernel expression ending at `end`: a qualified name with template arguments."""
    i = end
    while True:
        while i > 0 and text[i - 1].isspace():
            i -= 1
        if i > 0 and text[i - 1] == ">":  # template arguments: back to the balancing '<'
            depth = 0
            while i > 0:
                i -= 1
                depth += {">": 1, "<": -1}.get(text[i], 0)
                if depth == 0:
                    break
            if depth != 0:
                fail(name, end, "unbalanced template arguments before '<<<'")
            while i > 0 and text[i - 1].isspace():
                i -= 1
        m = IDENT.search(text, 0, i)
        if not m:
            fail(name, end, "no kernel name before '<<<'")
        i = m.start()
        if text[max(0, i - 2):i] != "::":
            return i
        i -= 2


def call_end(text, open_at, name):
    """Index just past the ')' closing the '(' at open_at."""
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    fail(name, open_at, "the launch's argument list does not close")


def rewrite(text: str, name: str) -> str:
    out, at = [], 0
    while (chevron := text.find("<<<", at)) >= 0:
        close = text.find(">>>", chevron)
        if close < 0:
            fail(name, chevron, "'<<<' without its '>>>'")
        paren = close + 3
        while paren < len(text) and text[paren].isspace():
            paren += 1
        if paren >= len(text) or text[paren] != "(":
            fail(name, close, "no argument list after '>>>'")
        end = call_end(text, paren, name)
        start = kernel_start(text, chevron, name)
        if start < at:
            fail(name, chevron, "a launch inside another launch's arguments")
        kernel, config, args = text[start:chevron].strip(), text[chevron + 3:close], text[paren + 1:end - 1]
        out.append(text[at:start])
        out.append(f"::grun_emu::launch({config})([=](const auto&... grun_emu_args) {{ {kernel}(grun_emu_args...); }}"
                   + (f", {args})" if args.strip() else ")"))
        at = end
    out.append(text[at:])
    text = DYNAMIC_SHARED.sub(
        lambda m: f"{m.group(1)}* const {m.group(2)} = reinterpret_cast<{m.group(1)}*>(::grun_emu::dynamic_shared());",
        "".join(out))
    return STATIC_SHARED.sub(lambda m: f"{m.group(1)} GRUN_EMU_SHARED_REGION({m.group(2)});", text)


def main(argv):
    if len(argv) < 3:
        sys.exit("usage: rewrite_launches.py OUT_DIR SRC_ROOT FILE...")
    out_dir, root = argv[1], argv[2]
    for path in argv[3:]:
        rel = os.path.relpath(path, root)
        if rel.startswith(".."):
            sys.exit(f"rewrite_launches.py: {path} is not under {root}")
        with open(path, encoding="utf-8") as f:
            text = rewrite(f.read(), path)
        target = os.path.join(out_dir, rel + (".cpp" if rel.endswith(".cu") else ""))
        if os.path.exists(target):
            with open(target, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)


if __name__ == "__main__":
    main(sys.argv)
