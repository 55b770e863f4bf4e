"""sass_loss_report.py's SASS reading, on a hand-written listing (no nvcc or nvdisasm needed): the hot
loop is the one loading the most bytes, pixels per iteration come from those bytes, blocks that call
a slow-path routine are left out of the fast path, and the report skips cleanly without the tools."""

from __future__ import annotations

import sass_loss_report as report

# A kernel shaped like backward_kernel<float, float>: setup, a two-vector loop (2 x 16 B of logits,
# 2 x 16 B of targets: 8 pixels) with an IEEE-division slow path, a one-vector tail loop, then its
# slow-path subroutine after EXIT.
LISTING = """
.text._Zkernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0020*/                   IMAD.WIDE R2, R0, 0x10, R4 ;
        /*0030*/                   LDG.E.128.CONSTANT R8, desc[UR4][R2.64] ;
        /*0040*/                   LDG.E.128.CONSTANT R12, desc[UR4][R2.64+0x10] ;
        /*0050*/                   LDG.E.128.CONSTANT R16, desc[UR4][R6.64] ;
        /*0060*/                   LDG.E.128.CONSTANT R20, desc[UR4][R6.64+0x10] ;
        /*0070*/                   MUFU.RCP R24, R8 ;
        /*0080*/                   FCHK P0, R9, R8 ;
        /*0090*/                   FFMA R25, R24, R9, RZ ;
        /*00a0*/              @!P0 BRA `(.L_x_2) ;
        /*00b0*/                   MOV R10, 0xd0 ;
        /*00c0*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath) ;
.L_x_2:
        /*00d0*/                   DADD R26, R26, R28 ;
        /*00e0*/                   F2I.TRUNC.NTZ R27, R25 ;
        /*00f0*/                   STG.E.128 desc[UR4][R2.64], R24 ;
        /*0100*/                   ISETP.GE.AND P1, PT, R0, UR6, PT ;
        /*0110*/              @!P1 BRA `(.L_x_1) ;
.L_x_3:
        /*0120*/                   LDG.E.128.CONSTANT R8, desc[UR4][R2.64] ;
        /*0130*/                   LDG.E.128.CONSTANT R16, desc[UR4][R6.64] ;
        /*0140*/                   FADD R8, R8, R16 ;
        /*0150*/              @!P1 BRA `(.L_x_3) ;
        /*0160*/                   EXIT ;
$__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath:
        /*0170*/                   FFMA R0, R1, R2, R3 ;
        /*0180*/                   RET.REL.NODEC R10 `(_Zkernel) ;
"""


def counted():
    lines = report.split_functions(LISTING)["_Zkernel"]
    return report.count_loop(lines, report.LoopCounts("backward_kernel", "float", "float", 1, True))


def test_hot_loop_pixels_and_fast_path():
    r = counted()
    assert r.pixels_per_iteration == 8  # 64 bytes loaded / (4 + 4) bytes a pixel
    assert r.loop_instructions == 16  # 0x0020 .. 0x0110
    assert r.slow_path_branches == 1 and r.slow_path_instructions == 2  # the MOV + CALL block
    assert r.fast_instructions == 14
    assert r.fchk == 1 and r.mufu == {"RCP": 1} and r.f64 == 1 and r.conversions == 1
    assert r.per_pixel["instr"] == 14 / 8 and r.per_pixel["cost"] == (14 + 7) / 8
    # Outside every loop and the subroutine: LDC, S2R and EXIT.
    assert r.outside_loops == 3


def test_without_the_tools_the_report_skips(monkeypatch, capsys):
    monkeypatch.setattr(report, "find_nvdisasm", lambda explicit: None)
    monkeypatch.setattr("sys.argv", ["sass_loss_report.py"])
    assert report.main() == 0
    assert "skipped" in capsys.readouterr().out
