# Circus agent protocol (SPEC §5). An agent dials the gateway, bootstraps the
# Runner capability, and registers with a Builder capability of its own; the
# runner pushes assignments to that Builder and receives logs, outputs and the
# result through sink capabilities it hands over with each assignment.
@0xf6ce6bdfa95f1a9d;

const protocolVersion :UInt32 = 1;

struct AgentInfo {
  hostname @0 :Text;
  name @1 :Text;
  machineId @2 :Text;
  systems @3 :List(Text);
  supportedFeatures @4 :List(Text);
  mandatoryFeatures @5 :List(Text);
  speedFactor @6 :Float64;
  cpuCount @7 :UInt32;
  maxJobs @8 :UInt32;
  protoVersion @9 :UInt32;
  authToken @10 :Text;
  ephemeral @11 :Bool;
  agentVersion @12 :Text;
}

struct Pressure {
  avg10 @0 :Float64;
  avg60 @1 :Float64;
}

struct Heartbeat {
  load1 @0 :Float64;
  load5 @1 :Float64;
  load15 @2 :Float64;
  memTotal @3 :UInt64;
  memUsed @4 :UInt64;
  storeFree @5 :UInt64;
  buildDirFree @6 :UInt64;
  currentJobs @7 :UInt32;
  cpu @8 :Pressure;
  mem @9 :Pressure;
  io @10 :Pressure;
  hasPressure @11 :Bool;
}

struct PresignOptions {
  enabled @0 :Bool;
  compression @1 :Text;
  level @2 :Int32;
  failBuildOnUploadError @3 :Bool;
}

struct Assignment {
  buildId @0 :UInt64;
  stepId @1 :UInt64;
  drvPath @2 :Text;
  maxLogSize @3 :UInt64;
  maxSilentTime @4 :UInt32;
  buildTimeout @5 :UInt32;
  extraNixArgs @6 :List(Text);
  expectedOutputs @7 :List(Text);
  # store paths the build needs: the derivation closure plus the outputs of its
  # inputs; the agent fetches the ones it lacks through `inputs`
  inputClosure @8 :List(Text);
  presign @9 :PresignOptions;
  cacheSubstituter @10 :Text;
  cachePublicKey @11 :Text;
}

enum Outcome {
  success @0;
  buildFailure @1;
  preparingFailure @2;
  importFailure @3;
  uploadFailure @4;
  postProcessFailure @5;
  aborted @6;
  timedOut @7;
  oomKilled @8;
  logLimitExceeded @9;
  failedWithOutput @10;
}

struct OutputInfo {
  name @0 :Text;
  path @1 :Text;
  narHash @2 :Text;
  narSize @3 :UInt64;
  closureSize @4 :UInt64;
}

struct Times {
  startedAt @0 :Float64;   # unix seconds
  finishedAt @1 :Float64;
}

# A byte stream written by one side and consumed by the other.
interface ByteSink {
  write @0 (chunk :Data) -> ();
  close @1 () -> ();
}

interface LogSink extends(ByteSink) {}

interface OutputSink extends(ByteSink) {
  # which of these store paths the runner lacks; only those are then streamed
  # (as `nix-store --export` in dependency order) through write/close
  missing @0 (paths :List(Text)) -> (missing :List(Text));
}

interface ResultSink {
  report @0 (outcome :Outcome, exitCode :Int32, times :Times,
             outputs :List(OutputInfo), errorMessage :Text) -> ();
}

interface InputSource {
  # stream `nix-store --export` of these paths (a subset of inputClosure) into sink
  fetch @0 (paths :List(Text), sink :ByteSink) -> ();
}

interface Builder {
  assign @0 (job :Assignment, logSink :LogSink, resultSink :ResultSink,
             outputSink :OutputSink, inputs :InputSource) -> (accepted :Bool, reason :Text);
  abort @1 (stepId :UInt64) -> ();
  shutdown @2 (reason :Text) -> ();
}

interface AgentSession {
  heartbeat @0 (beat :Heartbeat) -> (ok :Bool);
}

struct PresignRequest {
  storePath @0 :Text;
  narHash @1 :Text;
  narSize @2 :UInt64;
}

struct PresignedUrl {
  storePath @0 :Text;
  narUrl @1 :Text;
  narPath @2 :Text;
  compression @3 :Text;
  error @4 :Text;
}

struct NarInfoUpload {
  storePath @0 :Text;
  narHash @1 :Text;
  narSize @2 :UInt64;
  fileHash @3 :Text;
  fileSize @4 :UInt64;
  compression @5 :Text;
  narPath @6 :Text;
  references @7 :List(Text);
  deriver @8 :Text;
  ca @9 :Text;
}

interface Runner {
  version @0 () -> (proto :UInt32, server :Text);
  register @1 (info :AgentInfo, builder :Builder) -> (session :AgentSession, sessionId :Text);
  # uploads are for outputs of a step leased to this session (stepId), of a
  # build that needs it (buildId); anything else is refused
  requestPresignedUrls @2 (machineId :Text, buildId :UInt64, paths :List(PresignRequest),
                           stepId :UInt64)
      -> (urls :List(PresignedUrl));
  notifyUploadComplete @3 (machineId :Text, buildId :UInt64, narInfo :NarInfoUpload,
                           stepId :UInt64)
      -> (ok :Bool, error :Text);
}
