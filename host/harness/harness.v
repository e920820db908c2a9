// moegen_harness: the accelerator top as host/harness/main.cpp drives it.
//
// The reset comes from a power-on counter and tx is always ready, both inside the model:
// Amaranth's next-state logic reads rst (and tx__ready), and Verilator re-evaluates logic
// that depends on a model input on every eval(), twice per cycle. With rst as an input the
// default config ran 0.42M cycles per CPU second (0.60M with it inside).
module moegen_harness(
  input  wire       clk,
  input  wire       rx_valid,
  input  wire [7:0] rx_payload,
  output wire       rx_ready,
  output wire       tx_valid,
  output wire [7:0] tx_payload,
  output wire       idle,
  output wire       resetting
);
  reg [2:0] reset_cycles = 3'd4;
  assign resetting = reset_cycles != 3'd0;
  always @(posedge clk)
    if (resetting) reset_cycles <= reset_cycles - 3'd1;

  accelerator top (
    .clk(clk), .rst(resetting),
    .rx__valid(rx_valid), .rx__payload(rx_payload), .rx__ready(rx_ready),
    .tx__valid(tx_valid), .tx__payload(tx_payload), .tx__ready(1'b1),
    .idle(idle)
  );
endmodule
