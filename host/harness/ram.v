// moegen_sim_ram: the device memory of the Verilator harness (rtl/memory.py, EXTERNAL_RAM).
// One write port and one registered read port, WIDTH-bit words. No initializer: Verilator
// starts every word at zero, and an initializer of a multi-megabyte memory would make the
// generated Verilog and its compile slow.
module moegen_sim_ram #(
    parameter WIDTH = 64,
    parameter DEPTH = 1024,
    parameter ADDR_WIDTH = 10
) (
    input wire clk,
    input wire [ADDR_WIDTH-1:0] w_addr,
    input wire [WIDTH-1:0] w_data,
    input wire w_en,
    input wire [ADDR_WIDTH-1:0] r_addr,
    input wire r_en,
    output reg [WIDTH-1:0] r_data
);
    reg [WIDTH-1:0] words [0:DEPTH-1];

    always @(posedge clk) begin
        if (w_en)
            words[w_addr] <= w_data;
        if (r_en)
            r_data <= words[r_addr];
    end
endmodule
