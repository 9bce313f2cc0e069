// Checkpoint save/load throughput against the disk's own sequential write/read speed, measured in the
// same run on the same directory. Ranks are threads, each writing/reading its own shard file.
// Model: a transformer-like tensor set (d = 1024, embedding 32000 x d, L layers of qkv/o/up/down as
// Muon matrices with param + momentum, norms and embedding as AdamW with param + adam_m + adam_v,
// all fp32), L chosen so the total state is about --gib GiB. Page cache is dropped (posix_fadvise)
// before every read so reads come from the disk.
#include <fmt/format.h>

#include <cstring>
#include <filesystem>
#include <iostream>
#include <thread>
#include <vector>

#include "base/clock.h"
#include "base/dtype.h"
#include "bench/common/bench_util.h"
#include "checkpoint/async_saver.h"
#include "checkpoint/crc32c.h"
#include "checkpoint/io_util.h"
#include "checkpoint/reader.h"
#include "checkpoint/writer.h"

namespace fs = std::filesystem;
using namespace shardopt;
using namespace shardopt::ckpt;
using bench::Clock;
using bench::seconds_since;

namespace {

struct StateArray {
  std::string tensor, state;
  int64_t numel;
};

struct Model {
  std::vector<proto::CheckpointTensor> tensors;
  std::vector<StateArray> arrays;
  uint64_t bytes = 0;
};

Model make_model(double gib) {
  const int64_t d = 1024, vocab = std::max<int64_t>(1000, static_cast<int64_t>(32000 * std::min(1.0, gib)));
  Model m;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, std::vector<std::string> states) {
    proto::TensorSpec spec;
    spec.set_name(name);
    for (auto s : shape) spec.add_shape(s);
    spec.set_dtype(proto::BF16);
    auto t = make_tensor_entry(spec);
    int64_t n = 1;
    for (auto s : shape) n *= s;
    for (const auto& s : states) {
      add_state(t, s, DType::kF32);
      m.arrays.push_back({name, s, n});
      m.bytes += static_cast<uint64_t>(n) * 4;
    }
    m.tensors.push_back(t);
  };
  const std::vector<std::string> adam = {"param", "adam_m", "adam_v"}, muon = {"param", "momentum"};
  add("embed", {vocab, d}, adam);
  const double layer_bytes = 12.0 * d * d * 8 + 2.0 * d * 12;
  const int layers = std::max(1, static_cast<int>((gib * (1 << 30) - double(m.bytes)) / layer_bytes + 0.5));
  for (int l = 0; l < layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    add(p + "attn.qkv", {3 * d, d}, muon);
    add(p + "attn.o", {d, d}, muon);
    add(p + "mlp.up", {4 * d, d}, muon);
    add(p + "mlp.down", {d, 4 * d}, muon);
    add(p + "norm1", {d}, adam);
    add(p + "norm2", {d}, adam);
  }
  return m;
}

// Rank r holds the r-th contiguous slice of every array (flat ZeRO-style), backed by one buffer.
struct RankData {
  std::vector<float> buffer;
  std::vector<SavePiece> pieces;
  uint64_t bytes = 0;
};

std::vector<RankData> split(const Model& m, int ranks) {
  std::vector<RankData> out(ranks);
  for (int r = 0; r < ranks; ++r) {
    int64_t total = 0;
    for (const auto& a : m.arrays) total += (a.numel * (r + 1)) / ranks - (a.numel * r) / ranks;
    out[r].buffer.resize(total);
    for (int64_t i = 0; i < total; ++i) out[r].buffer[i] = static_cast<float>((i * 2654435761u + r) % 1000003) * 1e-3f;
    int64_t at = 0;
    for (const auto& a : m.arrays) {
      const int64_t begin = (a.numel * r) / ranks, end = (a.numel * (r + 1)) / ranks;
      out[r].pieces.push_back(SavePiece{a.tensor, a.state, begin, end - begin, DType::kF32, out[r].buffer.data() + at});
      at += end - begin;
    }
    out[r].bytes = static_cast<uint64_t>(total) * 4;
  }
  return out;
}

void drop_cache_dir(const fs::path& dir) {
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) File::open_read(e.path()).drop_cache();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"shardopt checkpoint save/load throughput"};
  bool json = false;
  double gib = 1.0;
  int repeats = 3;
  std::vector<int> rank_counts = {1, 2};
  std::string dir_arg = (fs::temp_directory_path() / "shardopt-ckpt-bench").string();
  bench::add_json_flag(app, json);
  app.add_option("--gib", gib, "total checkpoint size in GiB (all states)");
  bench::add_repeat_option(app, repeats, "--repeats");
  app.add_option("--ranks", rank_counts, "rank (thread) counts")->delimiter(',');
  app.add_option("--dir", dir_arg, "scratch directory (deleted afterwards)");
  CLI11_PARSE(app, argc, argv);
  const bench::Emitter emit(json);
  const fs::path root = fs::path(dir_arg) / fmt::format("run-{}", ::getpid());
  fs::create_directories(root);

  try {
    // CRC32C throughput (hardware path vs table fallback) on 64 MiB in memory.
    {
      std::vector<unsigned char> buf(size_t{64} << 20, 0x5a);
      for (int which = 0; which < 2; ++which) {
        uint32_t sink = 0;
        const double best = bench::best_seconds(repeats, [&] {
          sink ^= which == 0 ? crc32c_extend_hardware(0, buf.data(), buf.size())
                             : crc32c_extend_portable(0, buf.data(), buf.size());
        });
        emit({{"bench", "ckpt"}, {"measure", which == 0 ? "crc32c_sse42" : "crc32c_table"},
             {"hardware_available", crc32c_hardware_available()}, {"bytes", buf.size()},
             {"gbytes_per_s", buf.size() / best / 1e9}});
        if (sink == 0x12345678u) std::cerr << "";  // keeps the checksum computation alive
      }
    }

    const Model model = make_model(gib);
    const uint64_t total_bytes = model.bytes;

    // Disk baseline: one file, sequential write + fsync, then cold sequential read.
    double disk_write = 0, disk_read = 0;
    {
      std::vector<unsigned char> chunk(size_t{16} << 20, 0x33);
      double best_w = 1e30, best_r = 1e30;
      const fs::path file = root / "baseline.bin";
      for (int r = 0; r < repeats; ++r) {
        auto t0 = clock::now();
        File f = File::create(file);
        for (uint64_t done = 0; done < total_bytes; done += chunk.size())
          f.write_all(chunk.data(), std::min<uint64_t>(chunk.size(), total_bytes - done));
        f.fsync();
        f.close();
        best_w = std::min(best_w, seconds_since(t0));
        // Read in 128 MiB requests: the reader issues one pread per piece, pieces here reach ~128 MiB.
        std::vector<unsigned char> read_chunk(size_t{128} << 20);
        File rf = File::open_read(file);
        rf.drop_cache();
        t0 = clock::now();
        for (uint64_t done = 0; done < total_bytes; done += read_chunk.size())
          rf.pread_all(read_chunk.data(), std::min<uint64_t>(read_chunk.size(), total_bytes - done), done);
        best_r = std::min(best_r, seconds_since(t0));
      }
      fs::remove(file);
      disk_write = total_bytes / best_w / 1e9;
      disk_read = total_bytes / best_r / 1e9;
      emit({{"bench", "ckpt"}, {"measure", "disk_write_fsync"}, {"bytes", total_bytes}, {"seconds", best_w},
           {"gbytes_per_s", disk_write}});
      emit({{"bench", "ckpt"}, {"measure", "disk_read_cold"}, {"bytes", total_bytes}, {"seconds", best_r},
           {"gbytes_per_s", disk_read}});
    }

    for (int ranks : rank_counts) {
      auto data = split(model, ranks);
      double best_save = 1e30, best_load = 1e30, best_snapshot = 1e30;
      std::vector<double> rank_save(ranks, 1e30), rank_load(ranks, 1e30);
      std::vector<std::vector<float>> staging(ranks);  // the runtime's load staging, allocated once
      for (int r = 0; r < ranks; ++r) staging[r].resize(data[r].buffer.size());
      AsyncShardSaver saver;  // persistent: its snapshot buffer is reused across saves
      int64_t step = 0;
      for (int rep = 0; rep < repeats; ++rep) {
        ++step;
        // Save: prepare, every rank writes its shard concurrently, rank 0 finalizes.
        auto t0 = clock::now();
        const auto tmp = temp_checkpoint_dir(root, step);
        prepare_save_dir(tmp);
        std::vector<proto::CheckpointShardRecord> records(ranks);
        std::vector<std::thread> threads;
        for (int r = 0; r < ranks; ++r)
          threads.emplace_back([&, r] {
            auto t = clock::now();
            records[r] = save_shard(tmp, r, data[r].pieces);
            rank_save[r] = std::min(rank_save[r], seconds_since(t));
          });
        for (auto& t : threads) t.join();
        CheckpointInfo info;
        info.step = step;
        info.world_size = ranks;
        info.tensors = model.tensors;
        const auto dir = finalize_checkpoint(root, info, records, FinalizeOptions{1});
        best_save = std::min(best_save, seconds_since(t0));

        // Load: each rank reads its slice of every array from cold cache into its staging buffer.
        drop_cache_dir(dir);
        threads.clear();
        for (int r = 0; r < ranks; ++r) std::fill(staging[r].begin(), staging[r].end(), -1.0f);
        t0 = clock::now();
        for (int r = 0; r < ranks; ++r)
          threads.emplace_back([&, r] {
            auto t = clock::now();
            CheckpointReader reader(dir);
            int64_t at = 0;
            for (const auto& p : data[r].pieces) {
              reader.read(p.tensor, p.state, p.global_offset, p.length, staging[r].data() + at);
              at += p.length;
            }
            rank_load[r] = std::min(rank_load[r], seconds_since(t));
          });
        for (auto& t : threads) t.join();
        best_load = std::min(best_load, seconds_since(t0));
        for (int r = 0; r < ranks; ++r)
          if (std::memcmp(staging[r].data(), data[r].buffer.data(), data[r].bytes) != 0)
            throw std::runtime_error("loaded bytes differ from saved bytes");

        // Async: how long training is blocked by the snapshot copy (rank 0's shard); the first save
        // also pays for first-touching the snapshot buffer, later ones reuse it.
        const auto async_tmp = root / "async.tmp";
        t0 = clock::now();
        saver.start(async_tmp, 0, data[0].pieces);
        best_snapshot = std::min(best_snapshot, seconds_since(t0));
        saver.wait();
        fs::remove_all(async_tmp);
      }
      double max_rank_save = 0, max_rank_load = 0;
      for (int r = 0; r < ranks; ++r) max_rank_save = std::max(max_rank_save, rank_save[r]);
      for (int r = 0; r < ranks; ++r) max_rank_load = std::max(max_rank_load, rank_load[r]);
      const uint64_t per_rank_bytes = total_bytes / ranks;
      emit({{"bench", "ckpt"}, {"measure", "save"}, {"ranks", ranks}, {"bytes", total_bytes},
           {"tensors", model.tensors.size()}, {"seconds", best_save},
           {"total_gbytes_per_s", total_bytes / best_save / 1e9},
           {"per_rank_gbytes_per_s", per_rank_bytes / max_rank_save / 1e9},
           {"fraction_of_disk_write", total_bytes / best_save / 1e9 / disk_write}});
      emit({{"bench", "ckpt"}, {"measure", "load_cold"}, {"ranks", ranks}, {"bytes", total_bytes},
           {"seconds", best_load}, {"total_gbytes_per_s", total_bytes / best_load / 1e9},
           {"per_rank_gbytes_per_s", per_rank_bytes / max_rank_load / 1e9},
           {"fraction_of_disk_read", total_bytes / best_load / 1e9 / disk_read}});
      emit({{"bench", "ckpt"}, {"measure", "async_snapshot_blocking"}, {"ranks", ranks},
           {"bytes", data[0].bytes}, {"seconds", best_snapshot},
           {"gbytes_per_s", data[0].bytes / best_snapshot / 1e9}});
      for (const auto& [s, path] : list_checkpoints(root)) fs::remove_all(path);
    }
  } catch (const std::exception& e) {
    std::error_code ec;
    fs::remove_all(root, ec);
    std::cerr << "ckpt_bench: " << e.what() << "\n";
    return 1;
  }
  std::error_code ec;
  fs::remove_all(root, ec);
  fs::remove(dir_arg, ec);  // only if empty: another run may share it
  return 0;
}
