/*
 * The training forward and backward of a gating module, of the gated ReLU
 * and of a batch norm with its gated ReLU as C++ autograd nodes (see
 * mmgated/ops/training_nodes.py).
 *
 * The arithmetic is gate_training.c's and batch_norm_gated_relu.c's,
 * reached through function pointers
 * that bind_kernels receives from the compiled library already loaded: this
 * file only allocates the results and records the nodes. As Python
 * autograd Functions the same calls spend more time in the interpreter than
 * in the kernels: between two convolutions the interpreter's code and data
 * are out of the caches, and each Python operation costs some 15-30 us.
 *
 * Each entry returns None where its tensors are not what the kernels read
 * (float32, on the CPU, contiguous): the callers then use the Python
 * autograd Functions, which handle every case.
 */
#include <ATen/autocast_mode.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>

#include <optional>

namespace mmgated {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/* gate_training.c's entries. */
struct Kernels {
    long (*workspace_size)(long, long, long, long) = nullptr;
    int (*gate_forward)(const float*, long, long, long, const float*, long,
                        const float*, const float*, float*, float*, double,
                        double, const float*, const float*, long,
                        const float*, double, float*, float*, float*, float*,
                        int) = nullptr;
    void (*gate_backward)(long, long, long, long, long, const float*,
                          const float*, const float*, const float*, float*,
                          const float*, const float*, const float*,
                          const float*, const float*, double, float*, float*,
                          float*, float*, float*, float*) = nullptr;
    void (*relu_forward)(const float*, const float*, long, long, float*,
                         int) = nullptr;
    void (*relu_backward)(const float*, const float*, const float*, long,
                          long, float*, float*, int) = nullptr;
    void (*bn_relu_forward)(const float*, const float*, long, long, long,
                            const float*, const float*, double, float*,
                            float*, double, float*, float*, float*,
                            int) = nullptr;
    void (*bn_relu_backward)(const float*, const float*, const float*, long,
                             long, long, const float*, const float*,
                             const float*, const float*, float*, float*,
                             float*, float*, int) = nullptr;
} kernels;

bool readable(const Tensor& t) {
    return !t.defined() || (t.scalar_type() == at::kFloat &&
                            t.device().is_cpu() && t.is_contiguous());
}

float* data(const Tensor& t) {
    return t.defined() ? t.data_ptr<float>() : nullptr;
}

Tensor contiguous_or_undefined(const Tensor& t) {
    return t.defined() ? t.contiguous() : t;
}

Tensor value_or_undefined(const std::optional<Tensor>& t) {
    return t.has_value() ? *t : Tensor();
}

struct TrainingGate : public torch::autograd::Function<TrainingGate> {
    // Absent tensors (no affine, no running statistics) are nullopt: an
    // undefined Tensor would count as an input variable.
    static variable_list forward(AutogradContext* ctx, Tensor x,
                                 Tensor noise, Tensor fc1_weight,
                                 std::optional<Tensor> norm_weight_or_none,
                                 std::optional<Tensor> norm_bias_or_none,
                                 Tensor fc2_weight, Tensor fc2_bias,
                                 std::optional<Tensor> running_mean_or_none,
                                 std::optional<Tensor> running_var_or_none,
                                 double momentum, double eps, double tau) {
        ctx->set_materialize_grads(false);
        Tensor norm_weight = value_or_undefined(norm_weight_or_none);
        Tensor norm_bias = value_or_undefined(norm_bias_or_none);
        Tensor running_mean = value_or_undefined(running_mean_or_none);
        Tensor running_var = value_or_undefined(running_var_or_none);
        const int64_t n = x.size(0), c = x.size(1);
        const int64_t hw = x.size(2) * x.size(3);
        const int64_t hidden = fc1_weight.size(0), out = fc2_weight.size(0);
        // Kept for the backward; an intermediate, not a saved variable.
        Tensor workspace =
            at::empty({kernels.workspace_size(n, c, hidden, out)},
                      x.options());
        Tensor logits = at::empty({n, out}, x.options());
        Tensor relaxed = at::empty({n, out}, x.options());
        Tensor gates = at::empty({n, out}, x.options());
        kernels.gate_forward(
            data(x), n, c, hw, data(fc1_weight), hidden, data(norm_weight),
            data(norm_bias), data(running_mean), data(running_var), momentum,
            eps, data(fc2_weight), data(fc2_bias), out, data(noise), tau,
            data(workspace), data(logits), data(relaxed), data(gates),
            at::get_num_threads());
        // ATen's vectorised sigmoid, as the Python node.
        Tensor probs = at::sigmoid(logits);
        relaxed.sigmoid_();
        ctx->saved_data["workspace"] = workspace;
        ctx->saved_data["shape"] = x.sizes();
        ctx->saved_data["tau"] = tau;
        ctx->save_for_backward(
            {probs, relaxed, fc1_weight, norm_weight, fc2_weight});
        return {logits, probs, relaxed, gates};
    }

    static variable_list backward(AutogradContext* ctx,
                                  variable_list grads) {
        variable_list results(12);
        bool any = false;
        for (auto& g : grads) {
            g = contiguous_or_undefined(g);
            any = any || g.defined();
        }
        if (!any)
            return results;
        auto saved = ctx->get_saved_variables();
        const Tensor &probs = saved[0], &relaxed = saved[1];
        const Tensor &fc1_weight = saved[2], &norm_weight = saved[3];
        const Tensor& fc2_weight = saved[4];
        auto shape = ctx->saved_data["shape"].toIntVector();
        const int64_t n = shape[0], c = shape[1], hw = shape[2] * shape[3];
        const int64_t hidden = fc1_weight.size(0), out = fc2_weight.size(0);
        // The inputs whose gradients the kernel computes, with their
        // shapes; that of x is the pooled one, broadcast below.
        const int inputs[6] = {0, 2, 3, 4, 5, 6};
        const std::vector<int64_t> shapes[6] = {
            {n, c}, {hidden, c}, {hidden}, {hidden}, {out, hidden}, {out}};
        // needs_input_grad counts the inputs that are tensors, the
        // gradients returned count every argument: without affine there
        // are two tensors fewer before fc2's weight and bias.
        const bool affine = norm_weight.defined();
        const int absent_before[6] = {0, 0, 0, 0, affine ? 0 : 2,
                                      affine ? 0 : 2};
        Tensor computed[6];
        for (int i = 0; i < 6; i++)
            if ((affine || (i != 2 && i != 3)) &&
                ctx->needs_input_grad(inputs[i] - absent_before[i]))
                computed[i] = at::empty(shapes[i], probs.options());
        kernels.gate_backward(
            n, c, hw, hidden, out, data(grads[0]), data(grads[1]),
            data(grads[2]), data(grads[3]),
            data(ctx->saved_data["workspace"].toTensor()), data(probs),
            data(relaxed), data(fc1_weight), data(norm_weight),
            data(fc2_weight), ctx->saved_data["tau"].toDouble(),
            data(computed[0]), data(computed[1]), data(computed[2]),
            data(computed[3]), data(computed[4]), data(computed[5]));
        if (computed[0].defined())
            // A broadcast view, as the backward of a sum returns.
            computed[0] = computed[0].view({n, c, 1, 1}).expand(shape);
        for (int i = 0; i < 6; i++)
            results[inputs[i]] = computed[i];
        return results;
    }
};

struct GatedReLU : public torch::autograd::Function<GatedReLU> {
    static Tensor forward(AutogradContext* ctx, Tensor x, Tensor gates) {
        ctx->set_materialize_grads(false);
        // The gates' gradient comes back as float32; the autograd engine
        // casts it to the gates' dtype.
        Tensor gates32 = gates.to(at::kFloat).contiguous();
        Tensor out = at::empty_like(x);
        kernels.relu_forward(data(x), data(gates32), x.size(0) * x.size(1),
                             x.size(2) * x.size(3), data(out),
                             at::get_num_threads());
        ctx->save_for_backward({x, gates32});
        return out;
    }

    static variable_list backward(AutogradContext* ctx,
                                  variable_list grads) {
        if (!grads[0].defined())
            return {Tensor(), Tensor()};
        auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &gates = saved[1];
        Tensor grad_out = grads[0].contiguous();
        Tensor grad_x, grad_gates;
        if (ctx->needs_input_grad(0))
            grad_x = at::empty_like(x);
        if (ctx->needs_input_grad(1))
            grad_gates = at::empty({x.size(0), x.size(1)}, x.options());
        kernels.relu_backward(data(grad_out), data(x), data(gates),
                              x.size(0) * x.size(1), x.size(2) * x.size(3),
                              data(grad_x), data(grad_gates),
                              at::get_num_threads());
        return {grad_x, grad_gates};
    }
};

struct BatchNormGatedReLU
    : public torch::autograd::Function<BatchNormGatedReLU> {
    // Running statistics are absent (nullopt) where the norm tracks none.
    static Tensor forward(AutogradContext* ctx, Tensor x, Tensor weight,
                          Tensor bias, Tensor gates,
                          std::optional<Tensor> running_mean_or_none,
                          std::optional<Tensor> running_var_or_none,
                          double factor, double eps) {
        ctx->set_materialize_grads(false);
        Tensor gates32 = gates.to(at::kFloat).contiguous();
        Tensor running_mean = value_or_undefined(running_mean_or_none);
        Tensor running_var = value_or_undefined(running_var_or_none);
        const int64_t n = x.size(0), c = x.size(1);
        Tensor out = at::empty_like(x);
        Tensor mean = at::empty({c}, x.options());
        Tensor invstd = at::empty({c}, x.options());
        kernels.bn_relu_forward(data(x), data(gates32), n, c,
                                x.size(2) * x.size(3), data(weight),
                                data(bias), eps, data(running_mean),
                                data(running_var), factor, data(mean),
                                data(invstd), data(out),
                                at::get_num_threads());
        ctx->save_for_backward({x, weight, bias, gates32, mean, invstd});
        return out;
    }

    static variable_list backward(AutogradContext* ctx,
                                  variable_list grads) {
        variable_list results(8);
        if (!grads[0].defined())
            return results;
        auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2];
        const Tensor &gates = saved[3], &mean = saved[4];
        const Tensor& invstd = saved[5];
        Tensor grad_out = grads[0].contiguous();
        const Tensor* like[4] = {&x, &weight, &bias, &gates};
        for (int i = 0; i < 4; i++)
            if (ctx->needs_input_grad(i))
                results[i] = at::empty_like(*like[i]);
        kernels.bn_relu_backward(
            data(grad_out), data(x), data(gates), x.size(0), x.size(1),
            x.size(2) * x.size(3), data(weight), data(bias), data(mean),
            data(invstd), data(results[0]), data(results[1]),
            data(results[2]), data(results[3]), at::get_num_threads());
        return results;
    }
};

/* A norm's batch counter, as _BatchNorm keeps it. */
bool is_counter(const std::optional<Tensor>& t) {
    return !t.has_value() ||
           (t->scalar_type() == at::kLong && t->device().is_cpu() &&
            t->numel() == 1);
}

/* counter += 1 without the dispatcher, returning the new count. */
double count_batch(const Tensor& counter) {
    // The buffer's version moves as an in-place add would move it.
    counter.unsafeGetTensorImpl()->bump_version();
    return static_cast<double>(++*counter.data_ptr<int64_t>());
}

/* Advances a norm's batch counter (if it has one) and returns the factor
 * by which its running statistics move, as _BatchNorm.forward does. */
double running_stats_factor(
    const std::optional<Tensor>& num_batches_tracked,
    std::optional<double> momentum) {
    double factor = momentum.value_or(0.0);
    if (num_batches_tracked.has_value()) {
        const double count = count_batch(*num_batches_tracked);
        if (!momentum.has_value())  // a cumulative moving average
            factor = 1.0 / count;
    }
    return factor;
}

py::object training_gate(const Tensor& x,
                         const std::optional<Tensor>& noise_or_none,
                         const Tensor& fc1_weight,
                         const std::optional<Tensor>& norm_weight,
                         const std::optional<Tensor>& norm_bias,
                         const Tensor& fc2_weight, const Tensor& fc2_bias,
                         const std::optional<Tensor>& running_mean,
                         const std::optional<Tensor>& running_var,
                         const std::optional<Tensor>& num_batches_tracked,
                         std::optional<double> momentum, double eps,
                         double tau) {
    // The batch variance needs two samples; autocast and the MAC counters'
    // traces take the module-by-module path.
    if (x.dim() != 4 || x.size(0) < 2 ||
        at::autocast::is_autocast_enabled(x.device().type()) ||
        torch::jit::tracer::isTracing())
        return py::none();
    Tensor noise = value_or_undefined(noise_or_none);
    for (const Tensor* t : std::initializer_list<const Tensor*>{
             &x, &noise, &fc1_weight, &fc2_weight, &fc2_bias})
        if (!readable(*t))
            return py::none();
    for (const auto* t : {&norm_weight, &norm_bias, &running_mean,
                          &running_var})
        if (!readable(value_or_undefined(*t)))
            return py::none();
    if (!is_counter(num_batches_tracked))
        return py::none();
    // The kernels trust the shapes: check them, as the PyTorch operations
    // of the other paths would.
    const int64_t n = x.size(0), c = x.size(1);
    const int64_t hidden = fc1_weight.size(0), out = fc2_weight.size(0);
    bool shapes = fc1_weight.dim() == 2 && fc1_weight.size(1) == c &&
                  fc2_weight.dim() == 2 && fc2_weight.size(1) == hidden &&
                  fc2_bias.numel() == out &&
                  (!noise.defined() || (noise.dim() == 2 &&
                                        noise.size(0) == n &&
                                        noise.size(1) == out));
    for (const auto* t : {&norm_weight, &norm_bias, &running_mean,
                          &running_var})
        shapes = shapes && (!t->has_value() || (*t)->numel() == hidden);
    TORCH_CHECK_VALUE(
        shapes, "training_gate: inconsistent shapes: x ", x.sizes(),
        ", noise ", noise.defined() ? noise.sizes() : at::IntArrayRef(),
        ", fc1 weight ", fc1_weight.sizes(), ", fc2 weight ",
        fc2_weight.sizes(), ", fc2 bias ", fc2_bias.sizes());
    if (!noise.defined())
        // As mmgated.models.fused_gate.logistic_noise draws it, from the
        // same generator: a seed gives the same gates on either path.
        noise = at::rand({n, out}, x.options()).logit_(1e-6);
    const double factor =
        running_stats_factor(num_batches_tracked, momentum);
    auto outputs = TrainingGate::apply(
        x, noise, fc1_weight, norm_weight, norm_bias, fc2_weight, fc2_bias,
        running_mean, running_var, factor, eps, tau);
    return py::make_tuple(outputs[0], outputs[1], outputs[2], outputs[3]);
}

py::object gated_relu(const Tensor& x, const Tensor& gates) {
    if (x.dim() != 4 || !readable(x) || !gates.device().is_cpu() ||
        !at::isFloatingType(gates.scalar_type()))
        return py::none();
    TORCH_CHECK_VALUE(gates.dim() == 2 && gates.size(0) == x.size(0) &&
                          gates.size(1) == x.size(1),
                      "gated_relu: gates of shape ", gates.sizes(),
                      " for a map of shape ", x.sizes(), "; need (N, C)");
    return py::cast(GatedReLU::apply(x, gates));
}

py::object batch_norm_gated_relu(
    const Tensor& x, const Tensor& gates, const Tensor& weight,
    const Tensor& bias, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var,
    const std::optional<Tensor>& num_batches_tracked,
    std::optional<double> momentum, double eps) {
    // One value per channel has no batch variance: the norm itself raises.
    if (x.dim() != 4 || x.size(0) * x.size(2) * x.size(3) < 2 ||
        !readable(x) || !readable(weight) || !readable(bias) ||
        !readable(value_or_undefined(running_mean)) ||
        !readable(value_or_undefined(running_var)) ||
        !is_counter(num_batches_tracked) || !gates.device().is_cpu() ||
        !at::isFloatingType(gates.scalar_type()) ||
        torch::jit::tracer::isTracing())
        return py::none();
    const int64_t c = x.size(1);
    bool shapes = weight.numel() == c && bias.numel() == c;
    for (const auto* t : {&running_mean, &running_var})
        shapes = shapes && (!t->has_value() || (*t)->numel() == c);
    TORCH_CHECK_VALUE(shapes, "batch_norm_gated_relu: a map of ", c,
                      " channels with a norm of weight ", weight.sizes(),
                      " and bias ", bias.sizes());
    TORCH_CHECK_VALUE(gates.dim() == 2 && gates.size(0) == x.size(0) &&
                          gates.size(1) == c,
                      "gated_relu: gates of shape ", gates.sizes(),
                      " for a map of shape ", x.sizes(), "; need (N, C)");
    const double factor =
        running_stats_factor(num_batches_tracked, momentum);
    return py::cast(BatchNormGatedReLU::apply(x, weight, bias, gates,
                                              running_mean, running_var,
                                              factor, eps));
}

void bind_kernels(uintptr_t workspace_size, uintptr_t gate_forward,
                  uintptr_t gate_backward, uintptr_t relu_forward,
                  uintptr_t relu_backward, uintptr_t bn_relu_forward,
                  uintptr_t bn_relu_backward) {
    kernels.workspace_size =
        reinterpret_cast<decltype(kernels.workspace_size)>(workspace_size);
    kernels.gate_forward =
        reinterpret_cast<decltype(kernels.gate_forward)>(gate_forward);
    kernels.gate_backward =
        reinterpret_cast<decltype(kernels.gate_backward)>(gate_backward);
    kernels.relu_forward =
        reinterpret_cast<decltype(kernels.relu_forward)>(relu_forward);
    kernels.relu_backward =
        reinterpret_cast<decltype(kernels.relu_backward)>(relu_backward);
    kernels.bn_relu_forward =
        reinterpret_cast<decltype(kernels.bn_relu_forward)>(bn_relu_forward);
    kernels.bn_relu_backward =
        reinterpret_cast<decltype(kernels.bn_relu_backward)>(
            bn_relu_backward);
}

}  // namespace mmgated

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("bind_kernels", &mmgated::bind_kernels,
          "Bind gate_training.c's entries (their addresses).");
    m.def("training_gate", &mmgated::training_gate,
          "The gating module's training forward as one autograd node, with "
          "the noise drawn where it is None and the norm's batch counter "
          "advanced, or None (and nothing done) where the kernels cannot "
          "read the tensors.");
    m.def("gated_relu", &mmgated::gated_relu,
          "relu(x) * gates as one autograd node, or None where the kernels "
          "cannot read the tensors.");
    m.def("batch_norm_gated_relu", &mmgated::batch_norm_gated_relu,
          "relu(batch_norm(x)) * gates with the batch's statistics as one "
          "autograd node, the running statistics updated and the batch "
          "counter advanced, or None (and nothing done) where the kernels "
          "cannot read the tensors.");
}
