// The C# side of ampoule's C# kernel: Mono's C# evaluator (the engine of the `csharp` REPL)
// behind a line protocol with the Python driver (kernel.py).
//
// Requests on the FIFO named by args[0], one per line:
//   EXEC <base64 code>     evaluate; statements and declarations persist, a final expression
//                          is the result
//   INT                    abort the running evaluation (Thread.Abort), keeping the state
// Replies on the FIFO named by args[1], one per line, fields base64:
//   HELLO <version>
//   RESULT <text> <kind> <raw>    kind: none | number | bool | string (for application/json)
//   ERROR <name> <message> <traceback>
//   DONE ok|error|interrupted
// Console output goes to fds 1 and 2, which the driver streams.
using System;
using System.Collections;
using System.Globalization;
using System.IO;
using System.Reflection;
using System.Text;
using System.Threading;
using Mono.CSharp;

static class AmpouleEvaluator
{
    static StreamWriter reply;
    static Evaluator evaluator;
    static StringWriter report = new StringWriter();
    static Thread evalThread;
    static volatile bool evaluating;
    static volatile bool interrupted;
    static TextWriter stdout;
    static readonly object gate = new object();

    static string B64(string s) { return Convert.ToBase64String(Encoding.UTF8.GetBytes(s ?? "")); }

    static void Reply(params string[] fields)
    {
        lock (gate) { reply.Write(string.Join(" ", fields) + "\n"); reply.Flush(); }
    }

    // Mono cannot wrap an inherited pipe descriptor in a FileStream; FIFOs by path work.
    static FileStream OpenFifo(string path, FileAccess access)
    {
        return new FileStream(path, FileMode.Open, access, FileShare.ReadWrite, 4096);
    }

    static void Main(string[] args)
    {
        var requests = new StreamReader(OpenFifo(args[0], FileAccess.Read), new UTF8Encoding(false));
        reply = new StreamWriter(OpenFifo(args[1], FileAccess.Write), new UTF8Encoding(false));
        stdout = new StreamWriter(Console.OpenStandardOutput(), new UTF8Encoding(false)) { AutoFlush = true };
        Console.SetOut(stdout);
        Console.SetError(new StreamWriter(Console.OpenStandardError(), new UTF8Encoding(false)) { AutoFlush = true });

        var settings = new CompilerSettings();
        evaluator = new Evaluator(new CompilerContext(settings, new StreamReportPrinter(report)));
        evaluator.ReferenceAssembly(typeof(System.Linq.Enumerable).Assembly);
        evaluator.ReferenceAssembly(typeof(System.Xml.XmlDocument).Assembly);
        evaluator.Run("using System; using System.IO; using System.Linq; using System.Text; " +
                      "using System.Collections.Generic; using System.Threading.Tasks;");
        evalThread = Thread.CurrentThread;

        var queue = new System.Collections.Concurrent.BlockingCollection<string>();
        var reader = new Thread(() =>
        {
            string line;
            while ((line = requests.ReadLine()) != null)
            {
                if (line == "INT")
                {
                    if (evaluating)
                    {
                        // The evaluator catches the abort itself and prints "Interrupted!" and
                        // a stack trace to Console.Out: mute it until the evaluation returns.
                        interrupted = true;
                        Console.SetOut(TextWriter.Null);
                        evalThread.Abort();
                    }
                }
                else queue.Add(line);
            }
            queue.CompleteAdding();
        });
        reader.IsBackground = true;
        reader.Start();

        Reply("HELLO", B64("Mono " + MonoVersion()));
        foreach (var line in queue.GetConsumingEnumerable())
        {
            if (!line.StartsWith("EXEC ")) continue;
            string code = Encoding.UTF8.GetString(Convert.FromBase64String(line.Substring(5)));
            Execute(code);
        }
    }

    static string MonoVersion()
    {
        var t = Type.GetType("Mono.Runtime");
        var m = t == null ? null : t.GetMethod("GetDisplayName", BindingFlags.NonPublic | BindingFlags.Static);
        return m == null ? Environment.Version.ToString() : (string)m.Invoke(null, null);
    }

    static void Execute(string code)
    {
        string status = "ok";
        report.GetStringBuilder().Clear();
        try
        {
            object result = null;
            bool set = false;
            string rest;
            interrupted = false;
            evaluating = true;
            try { rest = evaluator.Evaluate(code, out result, out set); }
            finally
            {
                evaluating = false;
                Console.SetOut(stdout);
            }
            if (interrupted) throw new OperationCanceledException();
            Console.Out.Flush();
            Console.Error.Flush();
            string errors = report.ToString().Trim();
            if (errors.Contains("error CS"))
            {
                status = "error";
                var lines = errors.Split('\n');
                string first = lines[0];
                int at = first.IndexOf("error CS");
                Reply("ERROR", B64("CompilationError"), B64(at >= 0 ? first.Substring(at) : first), B64(errors));
            }
            else if (rest != null)
            {
                status = "error";
                Reply("ERROR", B64("CompilationError"), B64("incomplete input: " + rest.Trim()), B64(""));
            }
            else if (set)
            {
                string kind, raw;
                Classify(result, out kind, out raw);
                Reply("RESULT", B64(Repr(result)), kind, B64(raw));
            }
        }
        catch (Exception e) when (e is ThreadAbortException || (e is OperationCanceledException && interrupted))
        {
            if (e is ThreadAbortException) Thread.ResetAbort();
            Console.SetOut(stdout);
            status = "interrupted";
            Reply("ERROR", B64("Interrupted"), B64("the execution was interrupted"), B64(""));
        }
        catch (Exception e)
        {
            while (e is TargetInvocationException && e.InnerException != null) e = e.InnerException;
            status = "error";
            Reply("ERROR", B64(e.GetType().Name), B64(e.Message), B64(UserTrace(e)));
        }
        Console.Out.Flush();
        Console.Error.Flush();
        Reply("DONE", status);
    }

    // The exception's text without the evaluator's own frames.
    static string UserTrace(Exception e)
    {
        var kept = new StringBuilder();
        foreach (var line in e.ToString().Split('\n'))
        {
            if (line.Contains("Mono.CSharp.Evaluator")) break;
            kept.Append(line.TrimEnd()).Append('\n');
        }
        return kept.ToString().TrimEnd();
    }

    static void Classify(object v, out string kind, out string raw)
    {
        kind = "none";
        raw = "";
        if (v is bool) { kind = "bool"; raw = (bool)v ? "true" : "false"; }
        else if (v is string) { kind = "string"; raw = (string)v; }
        else if (v is sbyte || v is byte || v is short || v is ushort || v is int || v is uint || v is long || v is ulong)
        { kind = "number"; raw = Convert.ToString(v, CultureInfo.InvariantCulture); }
        else if (v is float || v is double || v is decimal)
        {
            double d = Convert.ToDouble(v, CultureInfo.InvariantCulture);
            if (!double.IsNaN(d) && !double.IsInfinity(d)) { kind = "number"; raw = d.ToString("R", CultureInfo.InvariantCulture); }
        }
    }

    static string Repr(object v)
    {
        if (v == null) return "null";
        if (v is string) return Quote((string)v);
        if (v is char) return "'" + v + "'";
        if (v is bool) return (bool)v ? "true" : "false";
        if (v is IFormattable) return ((IFormattable)v).ToString(null, CultureInfo.InvariantCulture);
        if (v is IDictionary)
        {
            var sb = new StringBuilder("{ ");
            bool first = true;
            foreach (DictionaryEntry e in (IDictionary)v)
            {
                if (!first) sb.Append(", ");
                first = false;
                sb.Append("{ ").Append(Repr(e.Key)).Append(", ").Append(Repr(e.Value)).Append(" }");
            }
            return sb.Append(first ? "}" : " }").ToString();
        }
        if (v is IEnumerable)
        {
            var sb = new StringBuilder("{ ");
            bool first = true;
            int n = 0;
            foreach (var x in (IEnumerable)v)
            {
                if (n++ == 200) { sb.Append(", ..."); break; }
                if (!first) sb.Append(", ");
                first = false;
                sb.Append(Repr(x));
            }
            return sb.Append(first ? "}" : " }").ToString();
        }
        return v.ToString();
    }

    static string Quote(string s)
    {
        var sb = new StringBuilder("\"");
        foreach (char c in s)
        {
            switch (c)
            {
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                default: sb.Append(c); break;
            }
        }
        return sb.Append('"').ToString();
    }
}
