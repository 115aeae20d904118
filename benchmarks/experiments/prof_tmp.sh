S=benchmarks/experiments/step_profile.py
export TRITON_CACHE_DIR=/tmp/tcache
for opt in adamw_8bit lion_8bit; do
  ncu --clock-control none --profile-from-start off -k regex:_kernel -c 1 --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats --section WarpStateStats --section LaunchStats --section Occupancy python3 $S --case leaf128M --opt $opt --profile > $OUT/ncu_detail_$opt.txt 2>&1
  grep -v "^==PROF==" $OUT/ncu_detail_$opt.txt | grep -E "Duration|Throughput|Executed Ipc|Issue Slots|Registers|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|L1/TEX Hit|Mem Busy|Max Bandwidth|Executed Instructions|Block Limit|Stall|Est" | head -50
done
for f in $(find /tmp/tcache -name "*_kernel.cubin"); do
  n=$(basename $f .cubin); cuobjdump -sass $f > $OUT/sass_$n.txt
  echo "== $n: $(grep -cE '^\s+/\*[0-9a-f]{4}\*/' $OUT/sass_$n.txt) SASS instructions"
  grep -oE '^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P[0-9T] )?[A-Z0-9_.]+' $OUT/sass_$n.txt | awk '{print $NF}' | sed 's/\..*//' | sort | uniq -c | sort -rn | head -25 | tr '\n' ' '; echo
done
