// moegen-harness: a Verilator main that serves the accelerator top on a Unix socket.
//
// The model (Verilator prefix Vtop) is harness.v's moegen_harness around the accelerator
// top (moegen.rtl.top.Accelerator's ports; see docs/device.md, "Harness"): clk,
// rx_valid/rx_payload/rx_ready (bytes from the host), tx_valid/tx_payload (bytes to the
// host, always ready), idle, and resetting (its power-on reset).
//
// One client at a time; the device keeps its state across clients. Received bytes enter rx
// one per cycle as the top accepts them; tx is always ready and its bytes are sent back in
// batches. The clock runs freely while the top is busy or bytes are pending, and the
// process sleeps in poll() while the top is idle and nothing is pending.
//
// Built by moegen.host.sim with MOEGEN_CONFIG_NAME, MOEGEN_CONFIG_SHA256 and MOEGEN_VERSION
// defined as string literals.

#include "Vtop.h"
#include "verilated.h"

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <memory>
#include <poll.h>
#include <string>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <vector>

#if !defined(MOEGEN_CONFIG_NAME) || !defined(MOEGEN_CONFIG_SHA256) || !defined(MOEGEN_VERSION)
#error "build with -DMOEGEN_CONFIG_NAME, -DMOEGEN_CONFIG_SHA256 and -DMOEGEN_VERSION (moegen.host.sim does)"
#endif

namespace {

const char *const USAGE = "usage: moegen-harness --socket PATH [--max-cycles N] | --version";
// Cycles between socket checks while clocking: one syscall per batch costs well under 1%.
constexpr unsigned BATCH_CYCLES = 256;
// Consecutive idle cycles, with nothing pending, before sleeping: covers an idle flag that
// lags the byte that made the top busy.
constexpr unsigned SETTLE_CYCLES = 8;
constexpr size_t RECV_CHUNK = 64 * 1024;

volatile sig_atomic_t stop_requested = 0;
int wake_pipe[2] = {-1, -1};

void on_signal(int) {
    stop_requested = 1;
    const char byte = 0;
    // A full pipe already wakes poll(); nothing to do if this write fails.
    [[maybe_unused]] ssize_t written = write(wake_pipe[1], &byte, 1);
}

[[noreturn]] void usage_error(const std::string &message) {
    std::fprintf(stderr, "moegen-harness: error: %s\n%s\n", message.c_str(), USAGE);
    std::exit(2);
}

[[noreturn]] void fail(const std::string &what) {
    std::fprintf(stderr, "moegen-harness: error: %s: %s\n", what.c_str(), std::strerror(errno));
    std::exit(1);
}

struct Options {
    std::string socket_path;
    uint64_t max_cycles = 0;  // 0: no limit
};

Options parse_args(int argc, char **argv) {
    Options options;
    bool have_socket = false;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "--version") {
            std::printf("moegen-harness (moegen %s): config %s, sha256 %s\n", MOEGEN_VERSION, MOEGEN_CONFIG_NAME,
                        MOEGEN_CONFIG_SHA256);
            std::exit(0);
        } else if (arg == "--socket" || arg == "--max-cycles") {
            if (i + 1 >= argc) usage_error(arg + " needs a value");
            const std::string value = argv[++i];
            if (arg == "--socket") {
                if (value.empty()) usage_error("--socket needs a non-empty path");
                if (value.size() >= sizeof(sockaddr_un::sun_path))
                    usage_error("socket path is longer than " + std::to_string(sizeof(sockaddr_un::sun_path) - 1) +
                                " bytes: " + value);
                options.socket_path = value;
                have_socket = true;
            } else {
                char *end = nullptr;
                errno = 0;
                const unsigned long long cycles = std::strtoull(value.c_str(), &end, 10);
                if (value.empty() || value[0] == '-' || *end != '\0' || errno == ERANGE || cycles == 0)
                    usage_error("--max-cycles needs a positive integer, not '" + value + "'");
                options.max_cycles = cycles;
            }
        } else {
            usage_error("unknown argument '" + arg + "'");
        }
    }
    if (!have_socket) usage_error("--socket PATH is required");
    return options;
}

// A listening Unix socket at `path`. A stale socket file (nobody listening) is replaced;
// anything else at that path is an error.
int listen_on(const std::string &path) {
    struct stat st;
    if (lstat(path.c_str(), &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) usage_error(path + " exists and is not a socket");
        sockaddr_un probe_addr{};
        probe_addr.sun_family = AF_UNIX;
        std::strncpy(probe_addr.sun_path, path.c_str(), sizeof(probe_addr.sun_path) - 1);
        const int probe = socket(AF_UNIX, SOCK_STREAM, 0);
        if (probe < 0) fail("socket");
        const bool live = connect(probe, reinterpret_cast<sockaddr *>(&probe_addr), sizeof(probe_addr)) == 0;
        close(probe);
        if (live) usage_error(path + " is in use by another process");
        if (unlink(path.c_str()) != 0) fail("cannot remove stale socket " + path);
    }
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) fail("socket");
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    if (bind(fd, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) != 0) fail("cannot bind " + path);
    if (listen(fd, 4) != 0) fail("cannot listen on " + path);
    return fd;
}

class Harness {
  public:
    Harness(Vtop &top, int listen_fd) : top_(top), listen_fd_(listen_fd) { in_.resize(RECV_CHUNK); }

    // Clocks through the model's power-on reset.
    void reset() {
        top_.rx_valid = 0;
        tick_low();  // the first eval applies initial values: resetting goes high
        while (top_.resetting) {
            tick_high();
            tick_low();
        }
    }

    // Runs until a stop signal or `max_cycles` (0: none).
    void serve(uint64_t max_cycles) {
        while (!stop_requested) {
            if (quiet_ >= SETTLE_CYCLES && in_pos_ == in_len_) {
                wait_for_io();
                continue;
            }
            const bool at_limit = run_batch(max_cycles);
            exchange();
            if (at_limit) break;
        }
        if (client_fd_ >= 0) send_output();  // a last try; never blocks
    }

    uint64_t cycles() const { return cycles_; }
    double idle_seconds() const { return idle_s_; }

  private:
    void tick_high() {
        top_.clk = 1;
        top_.eval();
    }

    void tick_low() {
        top_.clk = 0;
        top_.eval();
    }

    // One clock cycle: offer the next input byte, take any output byte, then the rising edge.
    void cycle() {
        const bool offer = in_pos_ < in_len_;
        top_.rx_valid = offer;
        if (offer) top_.rx_payload = in_[in_pos_];
        tick_low();
        const bool taken = offer && top_.rx_ready;
        if (top_.tx_valid) out_.push_back(top_.tx_payload);
        tick_high();
        in_pos_ += taken;
        ++cycles_;
    }

    // Up to BATCH_CYCLES cycles; stops early once settled. Returns whether max_cycles was hit.
    bool run_batch(uint64_t max_cycles) {
        for (unsigned n = 0; n < BATCH_CYCLES; ++n) {
            cycle();
            if (top_.idle && in_pos_ == in_len_) {
                if (++quiet_ >= SETTLE_CYCLES) return false;
            } else {
                quiet_ = 0;
            }
            if (cycles_ == max_cycles) return true;
        }
        return false;
    }

    // Non-blocking socket work between batches.
    void exchange() {
        if (client_fd_ < 0) {
            out_.clear();  // nobody to hear it, as on an unconnected wire
            accept_client();
            return;
        }
        if (!out_.empty()) send_output();
        if (client_fd_ >= 0 && in_pos_ == in_len_) receive();
    }

    // Settled: flush output and sleep until input, a client, writability or a signal.
    void wait_for_io() {
        if (client_fd_ >= 0 && !out_.empty()) send_output();
        pollfd fds[2] = {{wake_pipe[0], POLLIN, 0}, {-1, 0, 0}};
        if (client_fd_ >= 0)
            fds[1] = {client_fd_, static_cast<short>(POLLIN | (out_.empty() ? 0 : POLLOUT)), 0};
        else
            fds[1] = {listen_fd_, POLLIN, 0};
        const auto start = std::chrono::steady_clock::now();
        const int ready = poll(fds, 2, -1);
        idle_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (ready < 0) {
            if (errno == EINTR) return;
            fail("poll");
        }
        if (fds[1].revents == 0) return;
        if (client_fd_ < 0) {
            accept_client();
            return;
        }
        if (fds[1].revents & POLLOUT) send_output();
        if (client_fd_ >= 0 && (fds[1].revents & (POLLIN | POLLHUP | POLLERR))) receive();
    }

    void accept_client() {
        const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            client_fd_ = fd;
        } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED) {
            fail("accept");
        }
    }

    void drop_client() {
        close(client_fd_);
        client_fd_ = -1;
        out_.clear();
    }

    void receive() {
        const ssize_t got = recv(client_fd_, in_.data(), in_.size(), MSG_DONTWAIT);
        if (got > 0) {
            in_pos_ = 0;
            in_len_ = static_cast<size_t>(got);
            quiet_ = 0;
        } else if (got == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            drop_client();  // closed or reset; the device keeps its state for the next client
        }
    }

    void send_output() {
        while (!out_.empty()) {
            const ssize_t sent = send(client_fd_, out_.data(), out_.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
            if (sent > 0) {
                out_.erase(out_.begin(), out_.begin() + sent);
            } else if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
                return;
            } else {
                drop_client();
                return;
            }
        }
    }

    Vtop &top_;
    const int listen_fd_;
    int client_fd_ = -1;
    std::vector<uint8_t> in_;
    size_t in_pos_ = 0, in_len_ = 0;
    std::vector<uint8_t> out_;
    uint64_t cycles_ = 0;
    unsigned quiet_ = 0;
    double idle_s_ = 0.0;
};

}  // namespace

int main(int argc, char **argv) {
    const Options options = parse_args(argc, argv);
    if (pipe2(wake_pipe, O_NONBLOCK | O_CLOEXEC) != 0) fail("pipe");
    struct sigaction action {};
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGTERM, &action, nullptr);
    sigaction(SIGINT, &action, nullptr);
    signal(SIGPIPE, SIG_IGN);

    const auto context = std::make_unique<VerilatedContext>();
    const auto top = std::make_unique<Vtop>(context.get());
    const auto start = std::chrono::steady_clock::now();
    Harness harness(*top, listen_on(options.socket_path));
    harness.reset();
    std::printf("moegen-harness listening on %s\n", options.socket_path.c_str());
    std::fflush(stdout);

    harness.serve(options.max_cycles);

    top->final();
    unlink(options.socket_path.c_str());
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double clocking = wall - harness.idle_seconds();
    std::fprintf(stderr, "moegen-harness: cycles=%llu wall_s=%.3f idle_s=%.3f cycles_per_s=%.0f\n",
                 static_cast<unsigned long long>(harness.cycles()), wall, harness.idle_seconds(),
                 clocking > 0 ? harness.cycles() / clocking : 0.0);
    return 0;
}
