"""k8s/, Dockerfile and .dockerignore, checked without a cluster or a docker engine: the manifests parse and ask
for what a run needs, their commands are real entry points with real config files and known keys, the
preemption wrapper resumes (run with a fake `python`), and deploy.sh answers its verbs (with a fake `kubectl`)."""
import ast
import fnmatch
import os
import re
import shlex
import signal
import subprocess
import time

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is not installed: pip install pyyaml (a test-only dependency)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "k8s")
JOBS = {"pretrain-job.yaml": ("train", "train.py", "config/a100_2day.py"),
        "grpo-job.yaml": ("grpo", "grpo.py", "config/usmle.py")}  # file: (main container, script, config)
SHELL_OPS = {"&", ";", "&&", "||", "|"}


def load(name):
    with open(os.path.join(K8S, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def the(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def containers(name):
    spec = the(load(name), "Job")["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def script_of(container):
    assert container["command"] == ["bash", "-c"] and len(container["args"]) == 1, container["name"]
    return container["args"][0]


def python_commands(script):
    """[(argv after `python`)] for every python command line in a shell script."""
    out = []
    for line in script.replace("\\\n", "").splitlines():  # bash joins backslash-continued lines first
        tokens = shlex.split(line, comments=True)
        if "python" not in tokens:
            continue
        argv = tokens[tokens.index("python") + 1:]
        cut = next((i for i, t in enumerate(argv) if t in SHELL_OPS), len(argv))
        out.append(argv[:cut])
    return out


def module_defaults(script):
    """The module-level settings of train.py / grpo.py: lines `key = ...` at the top level."""
    with open(os.path.join(ROOT, script)) as f:
        return set(re.findall(r"^([a-z_][a-z0-9_]*) = ", f.read(), flags=re.M))


def argparse_flags(script):
    with open(os.path.join(ROOT, script)) as f:
        return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", f.read()))


def run_config(path):
    """A config file's settings (they are plain Python)."""
    namespace = {}
    exec(compile(open(os.path.join(ROOT, path)).read(), path, "exec"), namespace)
    return {k: v for k, v in namespace.items()  # as configurator.py
            if not k.startswith("_") and not callable(v) and not hasattr(v, "__file__")}


# ---- the manifests --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(JOBS))
def test_job_asks_for_a_gpu_a_pvc_and_retries_that_resume(name):
    docs = load(name)
    job, pvc = the(docs, "Job"), the(docs, "PersistentVolumeClaim")
    spec = job["spec"]["template"]["spec"]
    main = next(c for c in spec["containers"] if c["name"] == JOBS[name][0])
    assert main["resources"]["requests"]["nvidia.com/gpu"] == main["resources"]["limits"]["nvidia.com/gpu"] == 1
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert set(claims.values()) == {pvc["metadata"]["name"]}
    for c in containers(name):  # every container sees data/ and out/ on the PVC, where configs' relative paths point
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert c["workingDir"] == "/workspace" and c["image"] == "nanollm:latest"  # deploy.sh replaces this name
        for path, sub in [("/workspace/data", "data"), ("/workspace/out", "out")]:
            assert mounts[path]["name"] in claims and mounts[path]["subPath"] == sub
        env = {e["name"]: e for e in c["env"]}
        secret_ref = {"name": "nanollm-hf", "key": "HF_TOKEN", "optional": True}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == secret_ref
    # a preempted pod is replaced (restartPolicy Never + backoffLimit), and disruptions do not use up the retries
    assert spec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] >= 1
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
    assert spec["terminationGracePeriodSeconds"] >= 60  # time to finish a step and write a checkpoint


def test_both_jobs_define_the_same_pvc_and_the_secret_template_matches():
    pvc = "PersistentVolumeClaim"
    assert the(load("pretrain-job.yaml"), pvc) == the(load("grpo-job.yaml"), pvc)
    secret = the(load("secrets.yaml.template"), "Secret")
    assert secret["metadata"]["name"] == "nanollm-hf" and "HF_TOKEN" in secret["stringData"]


# ---- the commands in them -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(JOBS))
def test_commands_are_real_entry_points_with_real_configs_and_known_keys(name):
    seen = []
    for c in containers(name):
        for argv in python_commands(script_of(c)):
            if argv[0] == "-c":  # inline code: it compiles, and what it uses from this repo exists
                code = argv[1]
                compile(code, f"{name}:{c['name']}", "exec")
                for mod, attr in re.findall(r"\b(tasks|tokenizer|checkpoint|model)\.(\w+)", code):
                    source = open(os.path.join(ROOT, mod + ".py")).read()
                    assert re.search(rf"^def {attr}\b|^{attr} = ", source, re.M), f"{mod}.{attr}"
                continue
            script, rest = argv[0], argv[1:]
            assert os.path.isfile(os.path.join(ROOT, script)), f"{name}: {script} is not in the repository"
            configs = [a for a in rest if not a.startswith("-")]
            flags = [a for a in rest if a.startswith("--")]
            if script in ("train.py", "grpo.py"):  # configurator style: config files, then --key=value of defaults
                for cfg in configs:
                    is_config = cfg.startswith("config/") and os.path.isfile(os.path.join(ROOT, cfg))
                    assert is_config, f"{name}: no config file {cfg}"
                    unknown = set(run_config(cfg)) - module_defaults(script)
                    assert not unknown, f"{cfg} sets keys {script} does not have: {unknown}"
                for flag in flags:
                    key, sep, _ = flag[2:].partition("=")
                    assert sep and key in module_defaults(script), f"{name}: {flag} is not a --key=value of {script}"
            else:  # argparse style
                known = argparse_flags(script)
                for flag in flags:
                    assert flag.split("=")[0] in known, f"{name}: {script} has no option {flag}"
            seen.append((script, configs[:1]))
    _, script, config = JOBS[name]
    assert (script, [config]) in seen, f"{name} does not run {script} {config}"


def test_pretrain_paths_agree_with_its_config_and_grpo_starts_from_them():
    cfg = run_config("config/a100_2day.py")
    prep, train = (script_of(c) for c in containers("pretrain-job.yaml"))
    assert f"DATA={cfg['data_dir']} " in prep  # the init container prepares the data the config reads
    assert '--out "$DATA"' in prep
    out_dir = re.search(r"^OUT=(\S+)", train, re.M).group(1)
    assert out_dir == cfg["out_dir"]  # so `python train.py config/a100_2day.py --init_from=resume` by hand finds it too
    grpo = next(c for c in containers("grpo-job.yaml") if c["name"] == "grpo")
    init_from = {e["name"]: e.get("value") for e in grpo["env"]}["INIT_FROM"]
    assert init_from == f"{out_dir}/ckpt.pt"
    usmle = run_config("config/usmle.py")  # the GRPO job agrees with its config: a by-hand run finds the same files
    assert init_from == usmle["init_from"]
    assert re.search(r"^OUT=(\S+)", script_of(grpo), re.M).group(1) == usmle["out_dir"]


# ---- the preemption wrapper, run with a fake python ------------------------------------------------------------
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
if [ "$FAKE_MODE" = wait ]; then  # like train.py: on SIGTERM, write the checkpoint and exit 0
    trap 'mkdir -p "$FAKE_OUT" && touch "$FAKE_OUT/ckpt.pt"; exit 0' TERM
    touch started
    while true; do sleep 0.02; done
fi
exit 0
"""


def run_wrapper(script, cwd, env, send_term=False):
    proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own process group, to clean up after a failure
    try:
        if send_term:
            deadline = time.time() + 10
            while not os.path.exists(os.path.join(cwd, "started")) and time.time() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)  # what the kubelet sends to PID 1 at preemption
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the wrapper did not pass the signal on: the child would run forever
        pytest.fail("the wrapper did not end within 10 s of SIGTERM (is the signal passed on to python?)")
    return proc.returncode, out


@pytest.fixture
def fake_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"), "HOME": str(tmp_path)}
    return work, env, lambda: (tmp_path / "calls").read_text().splitlines()


def test_pretrain_wrapper_passes_sigterm_on_exits_nonzero_and_the_next_pod_resumes(fake_env):
    work, env, calls = fake_env
    script = script_of(containers("pretrain-job.yaml")[-1])
    out_dir = re.search(r"^OUT=(\S+)", script, re.M).group(1)
    rc, out = run_wrapper(script, work, {**env, "FAKE_MODE": "wait", "FAKE_OUT": out_dir}, send_term=True)
    assert rc == 143, out  # a failed pod, so the Job retries instead of counting a finished run
    assert (work / out_dir / "ckpt.pt").exists()  # train.py got the signal and checkpointed
    assert calls()[-1].startswith("train.py config/a100_2day.py") and "--init_from=scratch" in calls()[-1]
    rc, out = run_wrapper(script, work, {**env, "FAKE_MODE": "run"})
    assert rc == 0 and "--init_from=resume" in calls()[-1], out


def test_grpo_wrapper_starts_from_the_pretrain_checkpoint_then_resumes(fake_env):
    work, env, calls = fake_env
    grpo = next(c for c in containers("grpo-job.yaml") if c["name"] == "grpo")
    script, init_from = script_of(grpo), {e["name"]: e.get("value") for e in grpo["env"]}["INIT_FROM"]
    env = {**env, "INIT_FROM": init_from, "FAKE_MODE": "run"}
    rc, out = run_wrapper(script, work, env)
    assert rc == 2 and "no starting checkpoint" in out and not (work.parent / "calls").exists()  # FailJob, no retries
    (work / init_from).parent.mkdir(parents=True)
    (work / init_from).touch()
    rc, out = run_wrapper(script, work, env)
    assert rc == 0 and f"--init_from={init_from}" in calls()[-1], out
    (work / "out/usmle").mkdir(parents=True)
    (work / "out/usmle/ckpt.pt").touch()
    rc, out = run_wrapper(script, work, env)
    assert rc == 0 and "--init_from=resume" in calls()[-1], out


# ---- deploy.sh, with a fake kubectl ------------------------------------------------------------------------------
DEPLOY = os.path.join(K8S, "deploy.sh")


def test_deploy_sh_syntax_and_usage():
    assert subprocess.run(["bash", "-n", DEPLOY]).returncode == 0
    for args in ([], ["bogus"], ["logs", "bogus"]):
        r = subprocess.run(["bash", DEPLOY, *args], capture_output=True, text=True,
                           env={**os.environ, "PATH": "/usr/bin:/bin"})
        assert r.returncode == 2, (args, r.stderr)
        assert all(verb in r.stderr for verb in ("pretrain", "rl", "status", "logs", "NAMESPACE")), r.stderr


def test_deploy_sh_runs_the_right_kubectl_commands(tmp_path):
    (tmp_path / "kubectl").write_text('#!/usr/bin/env bash\necho "ARGS $*" >> "$LOG"\n'
                                      'case "$*" in *"-f -") cat >> "$LOG" ;; esac\n')  # a manifest on stdin
    (tmp_path / "kubectl").chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "LOG": str(log), "NAMESPACE": "ns1",
           "IMAGE": "reg.example/nanollm:v7"}
    for verb, expect in [("pretrain", "ARGS apply -n ns1 -f -"), ("rl", "ARGS apply -n ns1 -f -"),
                         ("status", "ARGS get pvc,jobs,pods -n ns1 -l app=nanollm"),
                         ("logs", "ARGS logs -f -n ns1 job/nanollm-pretrain"),
                         ("logs rl", "ARGS logs -f -n ns1 job/nanollm-grpo")]:
        log.write_text("")
        r = subprocess.run(["bash", DEPLOY, *verb.split()], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        text = log.read_text()
        assert text.startswith(expect), (verb, text[:200])
        if verb in ("pretrain", "rl"):  # the manifest went in on stdin, with the chosen image
            applied = list(yaml.safe_load_all(text.split("\n", 1)[1]))
            images = {c["image"] for d in applied if d["kind"] == "Job"
                      for pod in [d["spec"]["template"]["spec"]]
                      for c in pod["containers"] + pod.get("initContainers", [])}
            assert images == {"reg.example/nanollm:v7"}


# ---- the image --------------------------------------------------------------------------------------------------
def test_dockerfile_runs_the_scripts_as_a_non_root_user():
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base)
    users = [l.split()[1] for l in lines if l.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = [l for l in lines if l.startswith("ENTRYPOINT")]
    assert entry == ['ENTRYPOINT ["python"]']  # docker run IMAGE train.py config/x.py --key=value
    cmd = ast.literal_eval(next(l for l in lines if l.startswith("CMD")).split(None, 1)[1])
    assert os.path.isfile(os.path.join(ROOT, cmd[0])) and os.path.isfile(os.path.join(ROOT, cmd[1]))
    for l in lines:  # files copied by name exist (requirements.txt belongs to the core)
        if l.startswith("COPY") and "--from" not in l:
            for src in l.split()[1:-1]:
                if not src.startswith("--") and src != ".":
                    assert os.path.exists(os.path.join(ROOT, src)), f"Dockerfile copies {src}, not in the repository"


def test_dockerignore_keeps_data_out_and_secrets_out_and_the_code_in():
    patterns = [l.strip() for l in open(os.path.join(ROOT, ".dockerignore")) if l.strip() and not l.startswith("#")]
    for must in ("data/", "out/", ".git", "k8s/secrets.yaml"):
        assert must in patterns

    def ignored(path):  # Docker's rules for these simple patterns: from the context root; **/ = any folder
        return any(fnmatch.fnmatch(path, p.rstrip("/")) or fnmatch.fnmatch(path, p.rstrip("/") + "/*")
                   or (p.startswith("**/") and fnmatch.fnmatch(os.path.basename(path), p[3:])) for p in patterns)

    needed = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    needed += ["config/" + f for f in os.listdir(os.path.join(ROOT, "config"))]
    assert not [f for f in needed if ignored(f)]
    assert ignored("data/x/train.bin") and ignored("out/run/ckpt.pt") and ignored("tests/__pycache__/a.pyc")
