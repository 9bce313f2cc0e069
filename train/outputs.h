// What a training run leaves behind: the end-of-run report (validation loss, phase times, optimizer
// memory per rank against the ZeRO formula) and the files of the output folder.
#pragma once

#include <string>
#include <vector>

#include "runtime/trace.h"
#include "train/trainer.h"

namespace shardopt::train {

// Multi-line text: final losses, throughput, time per phase, memory per rank vs the ZeRO formula.
std::string final_report(const TrainResult& result, const TrainConfig& config, const std::string& backend);

// Writes into dir (created if missing), from rank 0's result:
//   loss.csv      step,train_loss,val_loss,lr_multiplier,tokens,bytes_per_rank,seconds,consensus_distance,
//                 max_attention_logit,qk_clipped_heads
//                 (val_loss / consensus_distance empty when not evaluated at that step)
//   loss.png      train/val loss vs step (gnuplot, pngcairo); skipped with a warning without gnuplot
//   sample.txt    generated text
//   summary.json  config, final losses, throughput, phase seconds, memory per rank, traffic; with
//                 resolved_config_json (the program's options, keyed like its flags) also "resolved_config"
// Returns the paths written, for the user.
std::vector<std::string> write_run_outputs(const std::string& dir, const TrainConfig& config,
                                           const TrainResult& result, const std::string& backend,
                                           const std::string& resolved_config_json = "");

// Chrome trace (Perfetto) of the recorded last steps, one track per rank.
void write_trace(const std::string& path, const std::vector<const TrainResult*>& ranks);

}  // namespace shardopt::train
