// shardopt._C: the Engine, its checkpoint I/O and the communicators, for Python trainers.
//
// Memory crosses the boundary without copies as nanobind ndarrays (the buffer protocol and DLPack):
// param(t)/grad(t) are views of the engine's buffers that keep the engine alive: numpy arrays for a
// host engine, DLPack arrays on the CUDA device for a device engine (memory_space="cuda", in a build
// with the CUDA toolkit). Nothing here links against libtorch; the torch integration
// (python/shardopt/torch.py) wraps the views with torch.from_numpy / torch.from_dlpack, so one build
// works with every torch 2.x.
//
// Device engines and the trainer's stream: the calls that take a gradient (grad_ready, accept_grad_at)
// are ordered after the CUDA stream the caller names (torch's current stream) with events, so backward
// never waits on the host: accept_grad_at copies the gradient with a kernel on that stream, and the
// bucket's reduction waits for the stream on the device (Engine::grad_ready(t, stream)). broadcast_
// synchronizes the stream (an initialization call). Every engine call returns with the engine's own
// work on its buffers finished, so any stream may read the parameters after step().
//
// GIL: every call that may communicate releases the GIL. The torch.distributed communicator
// (PyCommunicator) re-acquires it for each callback, so the engine runs the same code whatever
// the backend, and a backend's own threads never need Python.
#include <google/protobuf/text_format.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "base/error.h"
#include "comm/backend_util.h"
#include "comm/communicator.h"
#include "comm/mpi_backend.h"
#include "comm/thread_backend.h"
#include "runtime/checkpoint_io.h"
#include "runtime/engine.h"
#include "runtime/step_backend.h"
#include "sharding/layout.h"

#ifdef SHARDOPT_PYTHON_CUDA
#include <cuda_runtime.h>

#include "comm/cuda_buffer_mover.h"
#include "comm/nccl_backend.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;

namespace shardopt::python {
namespace {

using FloatArray = nb::ndarray<nb::numpy, float, nb::c_contig>;
// Any framework's contiguous host float32 array (torch tensors arrive through DLPack).
using CpuFloatTensor = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;

template <typename Message>
Message parse_text_proto(const std::string& text, const char* what) {
  Message m;
  if (!google::protobuf::TextFormat::ParseFromString(text, &m))
    throw ConfigError(std::string("cannot parse ") + what + " '" + text + "'");
  return m;
}

// ---------------------------------------------------------------------------------------------
// A Communicator whose collectives are carried out by a Python object (shardopt/_torch_comm.py
// implements them on torch.distributed). Each call hands the Python side numpy views of the
// engine's buffers and gets back an object with wait() and is_completed().

nb::object as_array(const void* ptr, size_t count, DType dtype) {
  void* p = const_cast<void*>(ptr);
  const size_t shape[1] = {count};
  nb::dlpack::dtype dt;
  switch (dtype) {
    case DType::kF32: dt = nb::dtype<float>(); break;
    case DType::kI32: dt = nb::dtype<int32_t>(); break;
    case DType::kI64: dt = nb::dtype<int64_t>(); break;
    case DType::kU8: dt = nb::dtype<uint8_t>(); break;
    case DType::kBF16:
    case DType::kF16: dt = nb::dtype<uint16_t>(); break;  // reinterpreted on the Python side
    default: throw ConfigError("torch.distributed communicator: unsupported dtype");
  }
  // rv_policy::reference: a view (an ownerless ndarray would otherwise be copied into Python).
  return nb::cast(nb::ndarray<nb::numpy>(p, 1, shape, nb::handle(), nullptr, dt), nb::rv_policy::reference);
}

class PyWork final : public comm::Work {
 public:
  PyWork(nb::object work, uint64_t seq) : work_(std::move(work)), seq_(seq) {}
  ~PyWork() override {
    // The engine drops Work handles with the GIL released; Python objects need it to die.
    if (!Py_IsInitialized()) {
      (void)work_.release();
      return;
    }
    nb::gil_scoped_acquire gil;
    work_.reset();
  }
  void wait(std::chrono::milliseconds timeout) override {
    nb::gil_scoped_acquire gil;
    try {
      work_.attr("wait")(timeout.count());
    } catch (nb::python_error& e) {
      error_ = std::make_exception_ptr(PeerError(std::string("torch.distributed: ") + e.what()));
      std::rethrow_exception(error_);
    }
  }
  void wait() override { wait(std::chrono::milliseconds(300000)); }
  bool done() override {
    nb::gil_scoped_acquire gil;
    return nb::cast<bool>(work_.attr("is_completed")());
  }
  std::exception_ptr error() const override { return error_; }
  uint64_t seq() const override { return seq_; }

 private:
  nb::object work_;
  uint64_t seq_;
  std::exception_ptr error_;
};

class PyCommunicator final : public comm::Communicator {
 public:
  explicit PyCommunicator(nb::object impl)
      : Communicator(comm::CommOptions::from_env()),
        impl_(std::move(impl)),
        rank_(nb::cast<int>(impl_.attr("rank"))),
        size_(nb::cast<int>(impl_.attr("size"))) {}
  ~PyCommunicator() override {
    if (!Py_IsInitialized()) {
      (void)impl_.release();
      return;
    }
    nb::gil_scoped_acquire gil;
    impl_.reset();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string_view backend() const override { return "torch.distributed"; }

  void abort(const std::string& reason) override {
    nb::gil_scoped_acquire gil;
    impl_.attr("abort")(reason);
  }

 protected:
  // Checks and traffic accounting happen in comm::Communicator before these run.
  std::unique_ptr<comm::Communicator> start_split(int, int) override {
    throw ConfigError("the torch.distributed communicator does not split; give ShardedOptimizer a process group");
  }

  comm::WorkPtr start_all_reduce(const void* send, void* recv, size_t count, DType dtype, comm::ReduceOp op) override {
    nb::gil_scoped_acquire gil;
    return issue("all_reduce", as_array(send, count, dtype), as_array(recv, count, dtype), dtype_name(dtype),
                 comm::reduce_op_name(op));
  }
  comm::WorkPtr start_reduce_scatter(const void* send, void* recv, std::span<const size_t> counts, DType dtype,
                               comm::ReduceOp op) override {
    const size_t total = comm::detail::sum_counts(counts), own = counts[rank_];
    nb::gil_scoped_acquire gil;
    return issue("reduce_scatter", as_array(send, total, dtype), as_array(recv, own, dtype),
                 std::vector<size_t>(counts.begin(), counts.end()), dtype_name(dtype), comm::reduce_op_name(op));
  }
  comm::WorkPtr start_all_gather(const void* send, void* recv, std::span<const size_t> counts, DType dtype) override {
    const size_t total = comm::detail::sum_counts(counts), own = counts[rank_];
    nb::gil_scoped_acquire gil;
    return issue("all_gather", as_array(send, own, dtype), as_array(recv, total, dtype),
                 std::vector<size_t>(counts.begin(), counts.end()), dtype_name(dtype));
  }
  comm::WorkPtr start_reduce(const void* send, void* recv, size_t count, DType dtype, comm::ReduceOp op,
                       int root) override {
    nb::gil_scoped_acquire gil;
    return issue("reduce", as_array(send, count, dtype), as_array(rank_ == root ? recv : nullptr, rank_ == root ? count : 0, dtype),
                 dtype_name(dtype), comm::reduce_op_name(op), root);
  }
  comm::WorkPtr start_broadcast(void* buf, size_t count, DType dtype, int root) override {
    nb::gil_scoped_acquire gil;
    return issue("broadcast", as_array(buf, count, dtype), dtype_name(dtype), root);
  }
  comm::WorkPtr start_all_to_all(const void* send, std::span<const size_t> send_counts, void* recv,
                           std::span<const size_t> recv_counts, DType dtype) override {
    nb::gil_scoped_acquire gil;
    return issue("all_to_all", as_array(send, comm::detail::sum_counts(send_counts), dtype),
                 std::vector<size_t>(send_counts.begin(), send_counts.end()),
                 as_array(recv, comm::detail::sum_counts(recv_counts), dtype),
                 std::vector<size_t>(recv_counts.begin(), recv_counts.end()), dtype_name(dtype));
  }
  comm::WorkPtr start_send(const void* buf, size_t count, DType dtype, int peer, int tag) override {
    nb::gil_scoped_acquire gil;
    return issue("send", as_array(buf, count, dtype), dtype_name(dtype), peer, tag);
  }
  comm::WorkPtr start_recv(void* buf, size_t count, DType dtype, int peer, int tag) override {
    nb::gil_scoped_acquire gil;
    return issue("recv", as_array(buf, count, dtype), dtype_name(dtype), peer, tag);
  }
  comm::WorkPtr start_sendrecv(const void* send, size_t send_count, int dst, void* recv, size_t recv_count, int src,
                         DType dtype, int tag) override {
    nb::gil_scoped_acquire gil;
    return issue("sendrecv", as_array(send, send_count, dtype), dst, as_array(recv, recv_count, dtype), src,
                 dtype_name(dtype), tag);
  }
  comm::WorkPtr start_barrier() override {
    nb::gil_scoped_acquire gil;
    return issue("barrier");
  }

 private:
  template <typename... Args>
  comm::WorkPtr issue(const char* method, Args&&... args) {
    try {
      return std::make_shared<PyWork>(impl_.attr(method)(std::forward<Args>(args)...), seq_++);
    } catch (nb::python_error& e) {
      throw PeerError(std::string("torch.distributed ") + method + ": " + e.what());
    }
  }

  nb::object impl_;
  int rank_, size_;
  uint64_t seq_ = 0;
};

// ---------------------------------------------------------------------------------------------

// MPI is initialized once per process, on first use, and finalized by mpi_finalize (atexit).
std::unique_ptr<comm::MpiRuntime>& mpi_runtime() {
  static std::unique_ptr<comm::MpiRuntime> runtime;
  return runtime;
}

struct PyEngine {
  std::unique_ptr<runtime::Engine> engine;
};

#ifdef SHARDOPT_PYTHON_CUDA
std::string cuda_error(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

// The CUDA device holding `p`; DeviceError when p is not device memory (e.g. a host tensor's
// address handed to a device engine).
int device_of(const void* p, const char* what) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw DeviceError(std::string(what) + ": not a CUDA pointer: " + cuda_error(err));
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw ConfigError(std::string(what) + " is not in CUDA device memory; the engine's buffers are on the GPU");
  return attr.device;
}

void synchronize_stream(uintptr_t stream) {
  const cudaError_t err = cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) throw DeviceError("synchronizing the caller's CUDA stream: " + cuda_error(err));
}
#endif

// A view of an engine buffer of `shape`: a numpy array (host engine) or a DLPack array on the
// engine's CUDA device.
nb::object buffer_view(runtime::Engine& e, float* data, const std::vector<size_t>& shape, nb::handle owner) {
  if (e.memory_space() == runtime::MemorySpace::kHost)
    return nb::cast(FloatArray(data, shape.size(), shape.data(), owner), nb::rv_policy::reference);
#ifdef SHARDOPT_PYTHON_CUDA
  const int device = device_of(data, "engine buffer");
  return nb::cast(nb::ndarray<float, nb::c_contig>(data, shape.size(), shape.data(), owner, nullptr,
                                                   nb::dtype<float>(), nb::device::cuda::value, device),
                  nb::rv_policy::reference);
#else
  throw ConfigError("this build of shardopt._C has no CUDA support");
#endif
}

nb::object tensor_view(runtime::Engine& e, size_t t, float* data, nb::handle owner) {
  const auto& spec = e.spec(t);
  return buffer_view(e, data, std::vector<size_t>(spec.shape().begin(), spec.shape().end()), owner);
}

// The caller's stream before the engine reads device memory it wrote (a host engine needs nothing).
void wait_for_caller(runtime::Engine& e, uintptr_t stream) {
  if (e.memory_space() == runtime::MemorySpace::kHost) return;
#ifdef SHARDOPT_PYTHON_CUDA
  synchronize_stream(stream);
#else
  (void)stream;
#endif
}

// Tensor t's gradient of this micro-batch from `src` (numel(t) floats, in the engine's memory
// space), times `scale`, then grad_ready(t). Adds when the engine accumulates locally (full buffers
// after the first micro-batch; host engines only: the adapter's device path hands gradients over in
// sharded mode, where every micro-batch has a fresh buffer). Device engines: the copy runs on
// `stream` (the CUDA stream that wrote src) and the bucket's reduction waits for it on the device.
void accept_grad(runtime::Engine& engine, size_t t, const float* src, float scale, uintptr_t stream = 0) {
  const auto n = static_cast<size_t>(engine.plan().tensors(static_cast<int>(t)).numel());
  float* dst = engine.grad(t);  // ZeRO-2: opens t's bucket buffer (zero-filled)
  if (engine.memory_space() != runtime::MemorySpace::kHost) {
    if (engine.grad_accumulates(t))
      throw ConfigError("accept_grad: '" + engine.spec(t).name() + "' accumulates locally (full gradient buffers); "
                        "on a device engine write into grad(t) instead");
    void* producer = reinterpret_cast<void*>(stream);
    engine.step_backend().copy_scaled_on_stream(dst, src, scale, n, producer);  // the host's product
    engine.grad_ready(t, producer);
    return;
  }
  if (engine.grad_accumulates(t)) {
    for (size_t i = 0; i < n; ++i) dst[i] += scale * src[i];
  } else if (scale == 1.0f) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
    for (size_t i = 0; i < n; ++i) dst[i] = scale * src[i];
  }
  engine.grad_ready(t);
}

nb::dict step_report(const runtime::StepReport& r) {
  nb::dict d;
  d["applied"] = r.applied;
  d["nonfinite_tensors"] = r.nonfinite_tensors;
  d["grad_norm"] = r.grad_norm;
  d["step"] = r.step;
  d["seconds"] = r.times.total;
  d["bytes_sent"] = r.traffic.total_sent();
  return d;
}

}  // namespace
}  // namespace shardopt::python

using shardopt::python::CpuFloatTensor;
using shardopt::python::PyEngine;
namespace so = shardopt;

NB_MODULE(_C, m) {
  m.doc() = "shardopt: the sharded optimizer engine (see shardopt.torch for the torch.optim wrapper)";
  // Engines are kept alive by the tensors viewing their buffers, which a trainer's globals may hold
  // until the interpreter exits, after nanobind's leak check.
  nb::set_leak_warnings(false);

  nb::exception<so::Error>(m, "Error");
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const so::ConfigError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const so::CheckpointError& e) {
      PyErr_SetString(PyExc_OSError, e.what());
    }
  });

  nb::class_<so::comm::Communicator>(m, "Communicator")
      .def_prop_ro("rank", &so::comm::Communicator::rank)
      .def_prop_ro("size", &so::comm::Communicator::size)
      .def_prop_ro("backend", [](so::comm::Communicator& c) { return std::string(c.backend()); })
      .def("bytes_sent", [](so::comm::Communicator& c) { return c.counters().total_sent(); });

  m.def("thread_world_of_one", [] { return std::move(so::comm::make_thread_world(1)[0]); },
        "A communicator of one rank (the threads backend).");
  m.def(
      "mpi_world",
      [] {
        auto& rt = shardopt::python::mpi_runtime();
        if (!rt) rt = std::make_unique<so::comm::MpiRuntime>(nullptr, nullptr);
        return rt->world();
      },
      "A communicator over MPI_COMM_WORLD (initializes MPI on first use).");
  m.def("mpi_finalize", [] { shardopt::python::mpi_runtime().reset(); });
#ifdef SHARDOPT_PYTHON_CUDA
  m.attr("has_cuda") = true;
  m.def("cuda_thread_world_of_one", [](int device) { return std::move(so::comm::make_cuda_thread_world(1, device)[0]); },
        "device"_a, "A communicator of one rank on CUDA device `device` (the threads backend on device buffers).");
  m.def(
      "nccl_unique_id",
      [] {
        ncclUniqueId id{};
        if (ncclGetUniqueId(&id) != ncclSuccess) throw so::PeerError("ncclGetUniqueId failed");
        return nb::bytes(reinterpret_cast<const char*>(&id), sizeof id);
      },
      "A new NCCL clique id (on one rank; every rank of the clique joins with it).");
  m.def(
      "nccl_communicator",
      [](nb::bytes id, int rank, int size, int device) -> std::unique_ptr<so::comm::Communicator> {
        ncclUniqueId uid{};
        if (id.size() != sizeof uid)
          throw so::ConfigError("nccl_communicator: the clique id has " + std::to_string(id.size()) + " bytes, expected " +
                                std::to_string(sizeof uid));
        std::memcpy(&uid, id.c_str(), sizeof uid);
        nb::gil_scoped_release release;
        return std::make_unique<so::comm::NcclCommunicator>(uid, rank, size, device);
      },
      "id"_a, "rank"_a, "size"_a, "device"_a,
      "Collective over the clique: an NCCL communicator on CUDA device `device` (one GPU per rank).");
  m.def(
      "nccl_mpi_world",
      [](int device) {
        auto& rt = shardopt::python::mpi_runtime();
        if (!rt) rt = std::make_unique<so::comm::MpiRuntime>(nullptr, nullptr);
        MPI_Comm world = MPI_COMM_WORLD;
        nb::gil_scoped_release release;
        return so::comm::make_nccl_communicator_mpi(world, device);
      },
      "device"_a, "An NCCL communicator over MPI_COMM_WORLD's ranks on CUDA device `device` (initializes MPI).");
#else
  m.attr("has_cuda") = false;
#endif
  m.def(
      "python_communicator",
      [](nb::object impl) -> std::unique_ptr<so::comm::Communicator> {
        return std::make_unique<shardopt::python::PyCommunicator>(std::move(impl));
      },
      "impl"_a, "A communicator whose collectives a Python object implements (shardopt._torch_comm).");

  nb::class_<PyEngine>(m, "Engine")
      .def(
          "__init__",
          [](PyEngine* self, so::comm::Communicator& comm, const std::vector<std::tuple<std::string, std::vector<int64_t>, std::string>>& params,
             int stage, const std::string& layout, int64_t bucket_bytes, const std::string& matrix_optimizer,
             const std::string& elementwise_optimizer, const std::string& routing, float max_grad_norm, bool overlap,
             const std::string& grad_memory, int grad_accumulation_steps, const std::string& memory_space,
             int device) {
            std::vector<so::proto::TensorSpec> specs;
            for (const auto& [name, shape, group] : params) {
              so::proto::TensorSpec s;
              s.set_name(name);
              for (int64_t d : shape) s.add_shape(d);
              s.set_dtype(so::proto::F32);
              s.set_group(group);
              specs.push_back(std::move(s));
            }
            so::runtime::EngineOptions o;
            o.zero_stage = stage;
            o.layout = so::sharding::parse_layout(layout);
            o.bucket_bytes = bucket_bytes;
            if (!matrix_optimizer.empty())
              o.matrix_optimizer = shardopt::python::parse_text_proto<so::proto::OptimizerConfig>(matrix_optimizer, "matrix optimizer");
            o.elementwise_optimizer =
                shardopt::python::parse_text_proto<so::proto::OptimizerConfig>(elementwise_optimizer, "element-wise optimizer");
            o.routing = shardopt::python::parse_text_proto<so::proto::RoutingRules>(routing, "routing rules");
            o.max_grad_norm = max_grad_norm;
            o.overlap = overlap;
            // "sharded": ZeRO-2 pooled bucket buffers, each micro-batch reduce-scattered into the shard
            // (the adapter hands every gradient over with accept_grad). "full": persistent full-size
            // buffers that autograd accumulates into (local accumulation, one reduction per step).
            if (grad_memory == "sharded") o.grad_memory = so::runtime::GradMemory::kSharded;
            else if (grad_memory == "full") o.grad_memory = so::runtime::GradMemory::kFull;
            else throw so::ConfigError("grad_memory must be 'sharded' or 'full', got '" + grad_memory + "'");
            o.grad_accumulation_steps = grad_accumulation_steps;
            o.memory_space = so::runtime::parse_memory_space(memory_space);
            o.device = device;
            nb::gil_scoped_release release;
            new (self) PyEngine{std::make_unique<so::runtime::Engine>(comm, std::move(specs), std::move(o))};
          },
          "comm"_a, "params"_a, "stage"_a, "layout"_a, "bucket_bytes"_a, "matrix_optimizer"_a,
          "elementwise_optimizer"_a, "routing"_a, "max_grad_norm"_a, "overlap"_a, "grad_memory"_a = "full",
          "grad_accumulation_steps"_a = 1, "memory_space"_a = "host", "device"_a = -1, nb::keep_alive<1, 2>())
      .def_prop_ro("memory_space",
                   [](PyEngine& e) { return std::string(so::runtime::memory_space_name(e.engine->memory_space())); },
                   "'host' or 'cuda': where the engine's buffers live (param/grad views are numpy or CUDA DLPack).")
      .def_prop_ro("num_tensors", [](PyEngine& e) { return e.engine->num_tensors(); })
      .def_prop_ro("rank", [](PyEngine& e) { return e.engine->comm().rank(); })
      .def_prop_ro("world_size", [](PyEngine& e) { return e.engine->comm().size(); })
      .def("is_muon", [](PyEngine& e, size_t t) { return e.engine->plan().tensors(static_cast<int>(t)).muon(); })
      .def(
          "param",
          [](nb::handle self, size_t t) {
            auto& e = *nb::cast<PyEngine&>(self).engine;
            if (t >= e.num_tensors()) throw nb::index_error();
            return shardopt::python::tensor_view(e, t, e.param(t), self);
          },
          "t"_a, "Tensor t's full parameter: a view of the engine's buffer.")
      .def(
          "grad",
          [](nb::handle self, size_t t) {
            auto& e = *nb::cast<PyEngine&>(self).engine;
            if (t >= e.num_tensors()) throw nb::index_error();
            return shardopt::python::tensor_view(e, t, e.grad(t), self);
          },
          "t"_a, "Where tensor t's gradient goes: a view of the engine's buffer.")
      .def(
          "set_params",
          [](PyEngine& e, const std::vector<shardopt::python::FloatArray>& values) {
            auto& engine = *e.engine;
            if (values.size() != engine.num_tensors()) throw so::ConfigError("set_params: one array per tensor");
            for (size_t t = 0; t < values.size(); ++t)
              if (static_cast<int64_t>(values[t].size()) != engine.plan().tensors(static_cast<int>(t)).numel())
                throw so::ConfigError("set_params: '" + engine.spec(t).name() + "' has the wrong size");
            std::vector<const float*> ptrs;
            for (const auto& v : values) ptrs.push_back(v.data());
            nb::gil_scoped_release release;
            engine.set_params([&](size_t t, float* dst) {
              std::memcpy(dst, ptrs[t], sizeof(float) * values[t].size());
            });
          },
          "values"_a)
      .def(
          "broadcast_",
          [](PyEngine& e, nb::ndarray<float, nb::c_contig> a, int root, uintptr_t stream) {
            const bool host = e.engine->memory_space() == so::runtime::MemorySpace::kHost;
            if (a.device_type() != (host ? nb::device::cpu::value : nb::device::cuda::value))
              throw so::ConfigError(std::string("broadcast_: the array must be in ") + (host ? "host" : "CUDA device") +
                                    " memory, like the engine's buffers");
            nb::gil_scoped_release release;
            shardopt::python::wait_for_caller(*e.engine, stream);
            e.engine->comm().broadcast(a.data(), a.size(), so::DType::kF32, root)->wait();
          },
          "array"_a, "root"_a, "stream"_a = 0,
          "Collective: overwrites `array` (host or device memory, as the engine's) with root's copy; a device array "
          "after `stream` (the CUDA stream that wrote it) is synchronized.")
      .def(
          "grad_ready",
          [](PyEngine& e, size_t t, uintptr_t stream) {
            if (t >= e.engine->num_tensors()) throw nb::index_error();
            e.engine->grad_ready(t, reinterpret_cast<void*>(stream));
          },
          "t"_a, "stream"_a = 0, nb::call_guard<nb::gil_scoped_release>(),
          "Tensor t's gradient is written in grad(t). Device engines: by kernels on `stream` (the CUDA stream: "
          "torch.cuda.current_stream().cuda_stream; 0 = the default stream), which may still run: the bucket's "
          "reduction waits for them on the device; the host does not wait.")
      .def_prop_ro("sharded_grads", [](PyEngine& e) { return e.engine->sharded_grads(); },
                   "True: gradients live in pooled bucket buffers (ZeRO-2); hand them over with accept_grad.")
      .def(
          "accept_grad",
          [](PyEngine& e, size_t t, CpuFloatTensor g, float scale) {
            auto& engine = *e.engine;
            if (t >= engine.num_tensors()) throw nb::index_error();
            if (engine.memory_space() != so::runtime::MemorySpace::kHost)
              throw so::ConfigError("accept_grad: a device engine takes device gradients (accept_grad_at)");
            const auto n = static_cast<size_t>(engine.plan().tensors(static_cast<int>(t)).numel());
            if (g.size() != n)
              throw so::ConfigError("gradient of '" + engine.spec(t).name() + "' has " + std::to_string(g.size()) +
                                    " values, the parameter " + std::to_string(n));
            const float* src = g.data();
            nb::gil_scoped_release release;
            shardopt::python::accept_grad(engine, t, src, scale);
          },
          "t"_a, "grad"_a, "scale"_a = 1.0f,
          "Writes scale * grad (any contiguous host float32 array) as tensor t's gradient of this micro-batch "
          "(adds when the engine accumulates locally), then grad_ready(t): a complete bucket's reduction starts.")
      .def(
          "accept_grad_at",
          [](PyEngine& e, size_t t, uintptr_t address, float scale, uintptr_t stream) {
            if (t >= e.engine->num_tensors()) throw nb::index_error();
#ifdef SHARDOPT_PYTHON_CUDA
            if (e.engine->memory_space() != so::runtime::MemorySpace::kHost) {
              const int device = shardopt::python::device_of(reinterpret_cast<const void*>(address), "gradient");
              const int mine = shardopt::python::device_of(e.engine->param(t), "engine buffer");
              if (device != mine)
                throw so::ConfigError("gradient of '" + e.engine->spec(t).name() + "' is on CUDA device " +
                                      std::to_string(device) + ", the engine on device " + std::to_string(mine));
            }
#endif
            nb::gil_scoped_release release;
            shardopt::python::accept_grad(*e.engine, t, reinterpret_cast<const float*>(address), scale, stream);
          },
          "t"_a, "address"_a, "scale"_a = 1.0f, "stream"_a = 0,
          "accept_grad from a raw address (torch's tensor.data_ptr()): the caller guarantees numel(t) contiguous "
          "float32 values there, in the engine's memory space (autograd's gradient of the parameter); a device "
          "engine copies them with a kernel on `stream` (the CUDA stream that wrote them), so the caller may free "
          "or reuse them in that stream's order. The autograd hook's fast path: converting a torch tensor through "
          "DLPack costs ~10 us per call.")
      .def(
          "zero_grads",
          [](PyEngine& e) {
            auto& engine = *e.engine;
            if (engine.sharded_grads()) return;  // pooled buffers start zeroed each micro-batch
            for (size_t t = 0; t < engine.num_tensors(); ++t)
              engine.step_backend().zero(engine.grad(t),
                                         static_cast<size_t>(engine.plan().tensors(static_cast<int>(t)).numel()));
          },
          "Full gradient buffers: zero every tensor's gradient (one call instead of one per tensor).")
      .def(
          "memory",
          [](PyEngine& e) {
            const auto m = e.engine->memory();
            nb::dict d;
            d["param_bytes"] = m.param_bytes;
            d["grad_buffer_bytes"] = m.grad_buffer_bytes;
            d["grad_shard_bytes"] = m.grad_shard_bytes;
            d["grad_slots"] = m.grad_slots;
            d["master_bytes"] = m.master_bytes;
            d["state_bytes"] = m.state_bytes;
            d["exchange_bytes"] = m.exchange_bytes;
            d["workspace_bytes"] = m.workspace_bytes;
            d["formula_optimizer_bytes"] = m.formula_optimizer_bytes;
            return d;
          },
          "Bytes this rank holds, by kind (runtime::MemoryReport).")
      .def(
          "buckets",
          [](PyEngine& e) {
            // Per bucket: (numel with padding, this rank's segment count, its tensors): the plan's
            // figures that the memory formulas use.
            const auto& plan = e.engine->plan();
            const int rank = e.engine->comm().rank();
            std::vector<std::tuple<int64_t, int64_t, std::vector<int>>> out;
            for (const auto& b : plan.buckets())
              out.emplace_back(b.numel(), b.segments(rank).count(), std::vector<int>(b.tensors().begin(), b.tensors().end()));
            return out;
          },
          "Per bucket: (elements incl. padding, this rank's segment elements, tensor indices).")
      .def_prop_rw(
          "max_grad_norm", [](PyEngine& e) { return e.engine->options().max_grad_norm; },
          [](PyEngine& e, float v) { e.engine->set_max_grad_norm(v); },
          "Clipping threshold (global L2 norm) of the coming steps; 0 = off. Set the same on every rank.")
      .def(
          "step",
          [](PyEngine& e, float lr_multiplier) {
            so::runtime::StepReport r;
            {
              nb::gil_scoped_release release;
              r = e.engine->step(lr_multiplier);
            }
            return shardopt::python::step_report(r);
          },
          "lr_multiplier"_a = 1.0f)
      .def_prop_rw(
          "optimizer_step", [](PyEngine& e) { return e.engine->optimizer_step(); },
          [](PyEngine& e, int64_t s) { e.engine->set_optimizer_step(s); })
      .def(
          "save",
          [](PyEngine& e, const std::string& root, const std::map<std::string, std::string>& extra) {
            so::runtime::TrainerState ts;
            ts.extra = extra;
            nb::gil_scoped_release release;
            return so::runtime::save_checkpoint(*e.engine, root, ts).dir.string();
          },
          "root"_a, "extra"_a, "Collective: writes root/ckpt-<step> and returns its path.")
      .def(
          "load",
          [](PyEngine& e, const std::string& dir) {
            nb::gil_scoped_release release;
            return so::runtime::load_checkpoint(*e.engine, dir).extra;
          },
          "dir"_a, "Collective: loads a checkpoint written at any world size; returns the saved extras.")
      .def(
          "gather_state",
          [](PyEngine& e) {
            // Collective: every (tensor, state) in full on every rank. Each element is held by exactly
            // one rank, so a sum over zero-filled buffers assembles it exactly.
            auto& engine = *e.engine;
            std::vector<std::map<std::string, std::vector<float>>> full(engine.num_tensors());
            {
              nb::gil_scoped_release release;
              for (size_t t = 0; t < engine.num_tensors(); ++t) {
                const auto& tp = engine.plan().tensors(static_cast<int>(t));
                for (const auto& state : so::runtime::engine_states_of(engine, t)) {
                  const int64_t n = state == "normuon_row_v" ? engine.spec(t).shape(0) : tp.numel();
                  full[t][state].assign(static_cast<size_t>(n), 0.0f);
                }
              }
              for (const auto& r : so::runtime::engine_state_ranges(engine))
                engine.step_backend().download(full[r.tensor].at(r.state).data() + r.global_offset, r.data,
                                               sizeof(float) * r.length);
              for (auto& states : full)
                for (auto& [name, v] : states)
                  engine.comm().all_reduce(v.data(), v.data(), v.size(), so::DType::kF32, so::comm::ReduceOp::kSum)->wait();
            }
            nb::list out;
            for (auto& states : full) {
              nb::dict d;
              for (auto& [name, v] : states) {
                auto* heap = new std::vector<float>(std::move(v));
                nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
                const size_t shape[1] = {heap->size()};
                d[name.c_str()] = shardopt::python::FloatArray(heap->data(), 1, shape, owner);
              }
              out.append(d);
            }
            return out;
          },
          "Collective: per tensor, a dict state name -> full flat float32 array.")
      .def(
          "scatter_state",
          [](PyEngine& e, const std::vector<std::map<std::string, shardopt::python::FloatArray>>& states, int64_t step) {
            auto& engine = *e.engine;
            if (states.size() != engine.num_tensors()) throw so::ConfigError("load_state_dict: one entry per tensor expected");
            const auto ranges = so::runtime::engine_state_ranges(engine);
            for (const auto& r : ranges) {
              auto it = states[r.tensor].find(r.state);
              if (it == states[r.tensor].end())
                throw so::ConfigError("load_state_dict: '" + engine.spec(r.tensor).name() + "' lacks state '" + r.state + "'");
              if (static_cast<int64_t>(it->second.size()) < r.global_offset + r.length)
                throw so::ConfigError("load_state_dict: state '" + r.state + "' of '" + engine.spec(r.tensor).name() +
                                      "' has " + std::to_string(it->second.size()) + " values, too few for this tensor");
            }
            for (const auto& r : ranges)
              engine.step_backend().upload(r.data, states[r.tensor].at(r.state).data() + r.global_offset,
                                           sizeof(float) * r.length);
            engine.set_optimizer_step(step);
            nb::gil_scoped_release release;
            engine.refresh_params();
          },
          "states"_a, "step"_a, "Collective: writes this rank's ranges from full states, then refreshes the parameters.")
      .def("states_of", [](PyEngine& e, size_t t) { return so::runtime::engine_states_of(*e.engine, t); })
      .def(
          "state_ranges",
          [](nb::handle self) {
            // Views of everything this rank holds (runtime::engine_state_ranges): over all ranks every
            // element of every (tensor, state) appears once, so they are the shards of a sharded
            // state dict (torch.distributed.checkpoint) that any world size can read back.
            auto& engine = *nb::cast<PyEngine&>(self).engine;
            nb::list out;
            for (const auto& r : so::runtime::engine_state_ranges(engine)) {
              if (r.data == nullptr)
                throw so::ConfigError("state '" + r.state + "' of '" + engine.spec(r.tensor).name() +
                                      "' is stored compact (bf16/q8): no fp32 view to share");
              const int64_t global = r.state == "normuon_row_v" ? engine.spec(r.tensor).shape(0)
                                                                : engine.plan().tensors(r.tensor).numel();
              out.append(nb::make_tuple(r.tensor, r.state, r.global_offset, global,
                                        shardopt::python::buffer_view(engine, r.data, {static_cast<size_t>(r.length)},
                                                                      self)));
            }
            return out;
          },
          "This rank's state: (tensor, state, global offset, global length, view of the values) per range "
          "(views in the engine's memory space).")
      .def(
          "refresh_params", [](PyEngine& e) { e.engine->refresh_params(); },
          nb::call_guard<nb::gil_scoped_release>(),
          "Collective: the parameters from the master shards (after the shards were written).");
}
